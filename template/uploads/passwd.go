package uploads

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNoUser is wrapped when a COPY owner names a user or group the root
// filesystem does not have.
var ErrNoUser = errors.New("no such user or group in the template")

// Owner is a resolved COPY owner, and the user's home directory (where a
// relative destination goes while no WORKDIR is set, as in E2B).
type Owner struct {
	UID, GID int
	Home     string
}

// LookupOwner resolves "user", "user:group", "uid" or "uid:gid" against
// the root filesystem's /etc/passwd and /etc/group (read with every symlink
// resolved inside root). A user without a group gets its primary group
// (E2B writes user:user, which fails where no group shares the user's
// name; the primary group is what that means everywhere it works). Numeric
// ids need no entry; a numeric uid without an entry gets gid = uid and home
// "/".
func LookupOwner(root, spec string) (Owner, error) {
	user, group, hasGroup := strings.Cut(spec, ":")
	if user == "" || (hasGroup && group == "") {
		return Owner{}, fmt.Errorf("%w: bad owner %q", ErrNoUser, spec)
	}
	var o Owner
	var found bool
	err := readDB(root, "/etc/passwd", func(f []string) bool {
		if len(f) < 7 || (f[0] != user && f[2] != user) {
			return false
		}
		uid, err1 := strconv.Atoi(f[2])
		gid, err2 := strconv.Atoi(f[3])
		if err1 != nil || err2 != nil {
			return false
		}
		o, found = Owner{UID: uid, GID: gid, Home: f[5]}, true
		return f[0] == user // prefer a name match over a uid match
	})
	if err != nil {
		return Owner{}, err
	}
	if !found {
		uid, err := strconv.Atoi(user)
		if err != nil || uid < 0 {
			return Owner{}, fmt.Errorf("%w: user %q is not in /etc/passwd", ErrNoUser, user)
		}
		o = Owner{UID: uid, GID: uid, Home: "/"}
	}
	if !hasGroup {
		return o, nil
	}
	if gid, err := strconv.Atoi(group); err == nil && gid >= 0 {
		o.GID = gid
		return o, nil
	}
	found = false
	err = readDB(root, "/etc/group", func(f []string) bool {
		if len(f) < 3 || f[0] != group {
			return false
		}
		gid, err := strconv.Atoi(f[2])
		if err != nil {
			return false
		}
		o.GID, found = gid, true
		return true
	})
	if err != nil {
		return Owner{}, err
	}
	if !found {
		return Owner{}, fmt.Errorf("%w: group %q is not in /etc/group", ErrNoUser, group)
	}
	return o, nil
}

// readDB calls fn with the colon-separated fields of each line of the file
// p inside root until fn returns true. A missing file is empty.
func readDB(root, p string, fn func([]string) bool) error {
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("uploads: open root %s: %w", root, err)
	}
	defer unix.Close(rfd)
	fd, err := unix.Openat2(rfd, "."+p, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NONBLOCK,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return fmt.Errorf("uploads: open %s in %s: %w", p, root, err)
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("uploads: %s in %s is not a regular file", p, root)
	}
	sc := bufio.NewScanner(io.LimitReader(f, 16<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		if fn(strings.Split(line, ":")) {
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("uploads: read %s in %s: %w", p, root, err)
	}
	return nil
}
