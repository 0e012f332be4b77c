package uploads

import (
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// ApplyCopy runs the COPY step st, valid and seen in state s (the state
// before it), with its uploaded tar r, on the root filesystem at root. It
// gives the step's args E2B's meaning:
//
//   - dest (args[1]) and owner (args[2]) are expanded against s's
//     environment; a relative dest is resolved against s.Workdir, or,
//     while no WORKDIR is set, against the home directory of s.User (E2B's
//     copy script cds there); a trailing / is kept;
//   - the owner is args[2] ("user" or "user:group") or, when empty, the
//     current USER (root if none), looked up in the root's /etc/passwd;
//   - mode (args[3]), when given, replaces the permission bits.
func ApplyCopy(root string, s buildspec.State, st buildspec.Step, r io.Reader, limits Limits) error {
	if st.Type != buildspec.Copy || len(st.Args) < 2 {
		return fmt.Errorf("uploads: ApplyCopy of a %s step with %d args", st.Type, len(st.Args))
	}
	dest, err := s.Expand(st.Args[1])
	if err != nil {
		return fmt.Errorf("COPY destination: %w", err)
	}
	if dest == "" {
		return fmt.Errorf("COPY destination %q expands to nothing", st.Args[1])
	}
	user := s.User
	if user == "" {
		user = "root"
	}
	ownerSpec := user
	if len(st.Args) >= 3 && st.Args[2] != "" {
		if ownerSpec, err = s.Expand(st.Args[2]); err != nil {
			return fmt.Errorf("COPY owner: %w", err)
		}
	}
	owner, err := LookupOwner(root, ownerSpec)
	if err != nil {
		return fmt.Errorf("COPY owner: %w", err)
	}
	if !path.IsAbs(dest) {
		base := s.Workdir
		if !path.IsAbs(base) {
			u, err := LookupOwner(root, user)
			if err != nil {
				return fmt.Errorf("COPY to relative %q with no WORKDIR: %w", dest, err)
			}
			base = path.Join(u.Home, base)
		}
		slash := strings.HasSuffix(dest, "/")
		dest = path.Join(base, dest)
		if slash && dest != "/" {
			dest += "/"
		}
	}
	o := CopyOptions{Src: st.Args[0], Dest: dest, UID: owner.UID, GID: owner.GID, Limits: limits}
	if len(st.Args) >= 4 && st.Args[3] != "" {
		m, err := strconv.ParseUint(st.Args[3], 8, 32)
		if err != nil || m > 0o7777 {
			return fmt.Errorf("COPY mode %q is not octal", st.Args[3])
		}
		o.Mode, o.SetMode = uint32(m), true
	}
	return CopyInto(root, r, o)
}
