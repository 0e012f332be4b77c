// Package identity answers, for one envd request, who it acts as and where its paths
// point: it looks up sandbox users (uid, gid, groups, home), reads the user a client
// names, and resolves client paths against the user's home or the default workdir.
package identity

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrUnknownUser is returned when a named user does not exist in the sandbox.
var ErrUnknownUser = errors.New("unknown user")

// ErrBadAuthorization is returned when an Authorization header is present but is not
// the SDK's `Basic base64("<user>:")` shape.
var ErrBadAuthorization = errors.New("malformed Authorization header")

// ErrInvalidPath is returned for paths that no file can have (an embedded NUL byte).
var ErrInvalidPath = errors.New("invalid path")

// User is a sandbox account as processes and files need it.
type User struct {
	Name   string
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups, primary group included
	Home   string
}

// Lookup finds a user by name in the sandbox's user database (/etc/passwd and
// /etc/group; envd is built without cgo so no NSS is consulted).
func Lookup(name string) (*User, error) {
	if name == "" || strings.ContainsAny(name, ":\n\x00") {
		return nil, fmt.Errorf("%w %q", ErrUnknownUser, name)
	}
	u, err := user.Lookup(name)
	if err != nil {
		return nil, fmt.Errorf("%w %q: %v", ErrUnknownUser, name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q has non-numeric uid %q", name, u.Uid)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q has non-numeric gid %q", name, u.Gid)
	}
	out := &User{Name: u.Username, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir, Groups: []uint32{uint32(gid)}}
	// A broken /etc/group must not lock the user out: the primary group is enough
	// to run a process, so lookup errors only cost the supplementary groups.
	if ids, err := u.GroupIds(); err == nil {
		for _, id := range ids {
			g, err := strconv.ParseUint(id, 10, 32)
			if err == nil && uint32(g) != out.GID {
				out.Groups = append(out.Groups, uint32(g))
			}
		}
	}
	return out, nil
}

// RequestedUser returns the user name a request names in `Authorization: Basic
// base64("<user>:")`, or "" when the header is absent (the caller then uses the
// sandbox's default user).
func RequestedUser(h http.Header) (string, error) {
	v := h.Get("Authorization")
	if v == "" {
		return "", nil
	}
	return ParseBasicUser(v)
}

// ParseBasicUser extracts the user name from an Authorization header value. The
// password part is ignored: envd authenticates with the access token, the user
// only selects the account to act as.
func ParseBasicUser(v string) (string, error) {
	const prefix = "basic "
	if len(v) < len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return "", ErrBadAuthorization
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(v[len(prefix):]))
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrBadAuthorization, err)
	}
	name, _, _ := strings.Cut(string(raw), ":")
	if name == "" {
		return "", fmt.Errorf("%w: empty user name", ErrBadAuthorization)
	}
	return name, nil
}

// ResolvePath turns a client-supplied path into an absolute, cleaned one. "~" and
// "~/…" expand to home; other relative paths are taken relative to workdir, or to
// home when no workdir is set. `..` components are resolved lexically: envd runs
// inside the sandbox, whose own root is the boundary, so there is nothing to escape
// to, but the result is always clean so it can be compared and reported.
func ResolvePath(p, home, workdir string) (string, error) {
	if home == "" {
		home = "/"
	}
	switch {
	case p == "~":
		p = filepath.Join("/", home)
	case strings.HasPrefix(p, "~/"):
		p = filepath.Join("/", home, p[2:])
	}
	if !filepath.IsAbs(p) {
		base := workdir
		if base == "" {
			base = home
		}
		// Join with "/" so a relative home or workdir still yields an absolute path.
		p = filepath.Join("/", base, p)
	}
	// Checked on the result: home and workdir come from files and /init, which
	// are trusted less than they look.
	if strings.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("%w: contains a NUL byte", ErrInvalidPath)
	}
	return filepath.Clean(p), nil
}
