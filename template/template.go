// Package template keeps sandbox templates on disk and builds the default
// template, base.
//
// A template lives in <dataDir>/templates/<templateID>/: rootfs/ is the root
// filesystem every sandbox of the template starts from (the runtimes use it
// read-only, as the lower layer of an overlay), and template.json is its
// metadata in the shape of the E2B API's Template object. A template appears
// only through the rename of a complete directory, so a reader never finds
// half of one, whatever crashed while it was written.
//
// BuildBase makes the base template: a Debian bookworm minbase with the tools
// an agent expects (bash, python3, node, git, curl, sudo, ...) and the user
// "user" that E2B sandboxes run as. Its slow part, debootstrap, is cached in a
// machine-wide cache directory under a hash of every input, so only the first
// build on a machine pays for it.
package template

import (
	"crypto/rand"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"
)

// BaseID is the ID, and the only alias, of the built-in default template.
// E2B SDKs create sandboxes from the template "base" when none is named.
const BaseID = "base"

// Defaults for a template's resources. They match E2B's defaults for a
// template built without options.
const (
	DefaultCPUCount   = 2
	DefaultMemoryMB   = 512
	DefaultDiskSizeMB = 2048
)

// DefaultEnvdVersion is the envd version recorded in templates. The E2B SDKs
// switch features on by it (0.4.0 default user, 0.5.2 closeStdin, 0.5.7
// octet-stream uploads), so it must not claim more than guest/envd serves.
const DefaultEnvdVersion = "0.5.7"

// idLength is the length of a generated template ID, as E2B's are.
const idLength = 20

var (
	// ErrNotFound means no template has the ID or alias asked for.
	ErrNotFound = errors.New("template not found")
	// ErrInvalid means a template's ID, aliases or resources are malformed.
	ErrInvalid = errors.New("invalid template")
	// ErrAliasTaken means another template already holds an alias.
	ErrAliasTaken = errors.New("template alias already taken")
	// ErrNotRoot means building needs root (debootstrap, chroot, chown).
	ErrNotRoot = errors.New("building a template rootfs needs root")
)

// Template is one template's metadata, stored as template.json. The JSON
// names are the E2B API's, so the api package can serve it as it is.
type Template struct {
	TemplateID  string    `json:"templateID"`
	Aliases     []string  `json:"aliases"`
	BuildID     string    `json:"buildID"`
	CPUCount    int       `json:"cpuCount"`
	MemoryMB    int       `json:"memoryMB"`
	DiskSizeMB  int       `json:"diskSizeMB"`
	EnvdVersion string    `json:"envdVersion"`
	CreatedAt   time.Time `json:"createdAt"`
	Public      bool      `json:"public"`
	// StartCmd, when set, is started in every sandbox of the template
	// before the sandbox is handed out (E2B's startCmd); ReadyCmd is run
	// until it exits 0 to tell that the start command is serving.
	StartCmd string `json:"startCmd,omitempty"`
	ReadyCmd string `json:"readyCmd,omitempty"`
	// Owner, for a template built through the API, is who may see and use
	// it (the API key's owner, as sandboxes have it); "" is everyone's
	// (base, code-interpreter-v1).
	Owner string `json:"owner,omitempty"`
	// Env ("K=V"), User and Workdir are what its build ended with: the
	// environment, default user and working directory of its sandboxes'
	// processes.
	Env     []string `json:"env,omitempty"`
	User    string   `json:"user,omitempty"`
	Workdir string   `json:"workdir,omitempty"`
}

var (
	idPattern = regexp.MustCompile(`^[a-z0-9]{20}$`)
	// aliasPattern is E2B's rule for aliases: lowercase letters, digits,
	// dashes and underscores, starting with a letter or digit.
	aliasPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)
)

// ValidID reports whether id can name a template: 20 characters of [a-z0-9],
// or BaseID. Every path the registry builds from an ID passes this first, so
// an ID can never climb out of the templates directory.
func ValidID(id string) bool {
	return id == BaseID || idPattern.MatchString(id)
}

// NewID returns a fresh random template ID.
func NewID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, idLength)
	// 252 is the largest multiple of 36 below 256: rejecting bytes at or
	// above it keeps every character equally likely.
	buf := make([]byte, 2*idLength)
	for n := 0; n < idLength; {
		if _, err := rand.Read(buf); err != nil {
			// crypto/rand.Read never fails on Linux (Go 1.24+); if the
			// kernel cannot give randomness nothing else is safe either.
			panic(fmt.Sprintf("template: crypto/rand: %v", err))
		}
		for _, c := range buf {
			if c < 252 && n < idLength {
				b[n] = alphabet[c%36]
				n++
			}
		}
	}
	return string(b)
}

// withDefaults fills the zero resources with the defaults and makes Aliases a
// non-nil slice, so template.json always carries an array as E2B clients
// expect.
func (t Template) withDefaults() Template {
	if t.CPUCount == 0 {
		t.CPUCount = DefaultCPUCount
	}
	if t.MemoryMB == 0 {
		t.MemoryMB = DefaultMemoryMB
	}
	if t.DiskSizeMB == 0 {
		t.DiskSizeMB = DefaultDiskSizeMB
	}
	if t.EnvdVersion == "" {
		t.EnvdVersion = DefaultEnvdVersion
	}
	if t.Aliases == nil {
		t.Aliases = []string{}
	}
	return t
}

// validate checks what the registry relies on: a safe ID, well-formed
// distinct aliases, and positive resources.
func (t Template) validate() error {
	if !ValidID(t.TemplateID) {
		return fmt.Errorf("%w: id %q is not 20 characters of [a-z0-9] nor %q", ErrInvalid, t.TemplateID, BaseID)
	}
	seen := make(map[string]bool, len(t.Aliases))
	for _, a := range t.Aliases {
		if !aliasPattern.MatchString(a) {
			return fmt.Errorf("%w: alias %q must match %s", ErrInvalid, a, aliasPattern)
		}
		if seen[a] {
			return fmt.Errorf("%w: alias %q given twice", ErrInvalid, a)
		}
		seen[a] = true
	}
	if t.CPUCount < 1 || t.MemoryMB < 1 || t.DiskSizeMB < 1 {
		return fmt.Errorf("%w: %s: cpuCount, memoryMB and diskSizeMB must be positive", ErrInvalid, t.TemplateID)
	}
	return nil
}

// hasAlias reports whether t answers to alias.
func (t Template) hasAlias(alias string) bool {
	return slices.Contains(t.Aliases, alias)
}
