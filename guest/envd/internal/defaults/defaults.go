// Package defaults holds what the host told envd about its sandbox through POST /init
// — environment variables, default user and default working directory — and turns a
// request's user selection into a sandbox user with those defaults applied.
package defaults

import (
	"maps"
	"net/http"
	"slices"
	"sync"

	"github.com/cubicle-dev/cubicle/guest/envd/internal/identity"
)

// FallbackUser is the account used when /init named none and no override was given:
// E2B templates create it (home /home/user, passwordless sudo). When it does not
// exist, envd falls back to root.
const FallbackUser = "user"

// Store is safe for concurrent use.
type Store struct {
	mu      sync.RWMutex      // guards the fields below
	env     map[string]string // env vars from /init, given to every process
	user    string            // default user; "" = FallbackUser if it exists, else root
	workdir string            // default working directory; "" = the user's home
}

// New returns a Store with the given initial default user and workdir (either may be
// empty).
func New(user, workdir string) *Store {
	return &Store{env: map[string]string{}, user: user, workdir: workdir}
}

// SetEnv merges vars into the sandbox environment.
func (s *Store) SetEnv(vars map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	maps.Copy(s.env, vars)
}

// Env returns a copy of the sandbox environment.
func (s *Store) Env() map[string]string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return maps.Clone(s.env)
}

// EnvList returns the sandbox environment as KEY=VALUE strings sorted by key, so
// processes see a stable order.
func (s *Store) EnvList() []string {
	env := s.Env()
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}

// SetUser sets the default user.
func (s *Store) SetUser(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.user = name
}

// SetWorkdir sets the default working directory.
func (s *Store) SetWorkdir(dir string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.workdir = dir
}

// Workdir returns the default working directory, "" when unset.
func (s *Store) Workdir() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workdir
}

// DefaultUser returns the name of the default user.
func (s *Store) DefaultUser() string {
	s.mu.RLock()
	name := s.user
	s.mu.RUnlock()
	if name != "" {
		return name
	}
	// Looked up on every call rather than once: a template build may create the
	// user after envd has started.
	if _, err := identity.Lookup(FallbackUser); err == nil {
		return FallbackUser
	}
	return "root"
}

// User resolves the user a request acts as: name when non-empty (the /files
// `username` query parameter), else the one in the Authorization header, else the
// default user. Errors wrap identity.ErrUnknownUser or identity.ErrBadAuthorization.
func (s *Store) User(h http.Header, name string) (*identity.User, error) {
	if name == "" {
		var err error
		if name, err = identity.RequestedUser(h); err != nil {
			return nil, err
		}
	}
	if name == "" {
		name = s.DefaultUser()
	}
	return identity.Lookup(name)
}

// Resolve resolves a client path for user u (see identity.ResolvePath).
func (s *Store) Resolve(p string, u *identity.User) (string, error) {
	return identity.ResolvePath(p, u.Home, s.Workdir())
}
