// Package buildspec is the E2B template-build request: the body of
// `POST /v2/templates/{templateID}/builds/{buildID}` (E2B's
// TemplateBuildStartV2), its validation, the meaning of each step, and the
// cache key of each step's result.
//
// A build starts from exactly one base (fromImage, optionally with
// fromImageRegistry credentials, or fromTemplate) and applies steps in order.
// The step types and their args, as the e2b SDK (2.45–2.51) sends them:
//
//	RUN     [command]  or [command, user]    run `command` with `sh -c`; user overrides USER for this step only
//	COPY    [src, dest, user, mode] + filesHash  copy the uploaded files; user and mode may be ""
//	ENV     [k1, v1, k2, v2, ...]             set environment variables for later steps and the template
//	WORKDIR [path]                            set (and create) the working directory
//	USER    [name] or [name, "true"|"false"]  set the user of later steps (created if missing; "true": sudoer)
//
// ENV values, WORKDIR, USER and COPY's dest and user are expanded against
// the environment of the build so far ($VAR, ${VAR}, ${VAR:-word},
// ${VAR:+word}; \$ is a literal dollar), as E2B's builder does by passing them
// through the sandbox's shell. See State.
//
// Parse decodes and validates; it refuses anything a builder could not run
// with an error wrapping ErrInvalid that names the offending field.
package buildspec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"regexp"
	"strings"
	"unicode/utf8"
)

// ErrInvalid is wrapped by every error Parse and Validate return; the API
// answers it with 400.
var ErrInvalid = errors.New("invalid template build")

// Limits on a build request. They are far above what a real template uses
// and exist so that a hostile body cannot make the builder hold or run an
// absurd amount.
const (
	// MaxBodyBytes bounds the JSON body the API should read before Parse.
	MaxBodyBytes = 8 << 20
	// MaxSteps bounds the number of steps in one build.
	MaxSteps = 2048
	// MaxArgBytes bounds one argument (a RUN command may be a whole script).
	MaxArgBytes = 1 << 20
	// MaxEnvPairs bounds the variables one ENV step sets.
	MaxEnvPairs = 1024
	// MaxRefBytes bounds fromImage and fromTemplate.
	MaxRefBytes = 512
)

// Step types.
const (
	Run     = "RUN"
	Copy    = "COPY"
	Env     = "ENV"
	Workdir = "WORKDIR"
	User    = "USER"
)

// Spec is TemplateBuildStartV2: what to build a template from.
type Spec struct {
	// FromImage is an OCI image reference (e.g. "python:3.12").
	FromImage string `json:"fromImage,omitempty"`
	// FromImageRegistry holds credentials for FromImage's registry.
	FromImageRegistry *Registry `json:"fromImageRegistry,omitempty"`
	// FromTemplate is the ID or name (optionally name:tag) of a template.
	FromTemplate string `json:"fromTemplate,omitempty"`
	// Force rebuilds every step regardless of the cache.
	Force bool `json:"force,omitempty"`
	// StartCmd is started when the template is finalized and keeps running
	// in every sandbox created from it.
	StartCmd string `json:"startCmd,omitempty"`
	// ReadyCmd is retried until it exits 0; then the template is captured.
	ReadyCmd string `json:"readyCmd,omitempty"`
	Steps    []Step `json:"steps,omitempty"`
}

// Step is TemplateStep. Args are per type (see the package doc).
type Step struct {
	Type string   `json:"type"`
	Args []string `json:"args,omitempty"`
	// FilesHash names the uploaded tar of a COPY step (64 hex digits, the
	// SDK's recipe over the copied files; see template/dockerfile).
	FilesHash string `json:"filesHash,omitempty"`
	// Force runs this step even if its result is cached.
	Force bool `json:"force,omitempty"`

	// The SDK serializes its whole COPY instruction, so these client-side
	// options arrive too. They change nothing on the server (the tar was
	// already made by the client); they are kept so a body round-trips.
	ForceUpload     *bool `json:"forceUpload,omitempty"`
	ResolveSymlinks *bool `json:"resolveSymlinks,omitempty"`
	Gzip            *bool `json:"gzip,omitempty"`
}

// Registry is FromImageRegistry. Only Type "registry" (user name and
// password) is usable by cubicle; "aws" and "gcp" parse but are refused.
type Registry struct {
	Type               string `json:"type"`
	Username           string `json:"username,omitempty"`
	Password           string `json:"password,omitempty"`
	AWSAccessKeyID     string `json:"awsAccessKeyId,omitempty"`
	AWSSecretAccessKey string `json:"awsSecretAccessKey,omitempty"`
	AWSRegion          string `json:"awsRegion,omitempty"`
	ServiceAccountJSON string `json:"serviceAccountJson,omitempty"`
}

// Error is a validation error: Field is a JSON path into the body
// ("steps[3].args"), Msg says what is wrong. It wraps ErrInvalid.
type Error struct {
	Field string
	Msg   string
}

func (e *Error) Error() string {
	if e.Field == "" {
		return "invalid template build: " + e.Msg
	}
	return "invalid template build: " + e.Field + ": " + e.Msg
}

// Unwrap makes errors.Is(err, ErrInvalid) hold.
func (e *Error) Unwrap() error { return ErrInvalid }

func errf(field, format string, args ...any) error {
	return &Error{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// Parse decodes a TemplateBuildStartV2 body and validates it. Step types are
// normalized to upper case. Unknown fields are ignored, as E2B's server does,
// so a newer SDK's additions do not break a build.
func Parse(body []byte) (Spec, error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return Spec{}, errf("", "request body is empty: a JSON object is required")
	}
	if len(body) > MaxBodyBytes {
		return Spec{}, errf("", "request body of %d bytes is larger than %d", len(body), MaxBodyBytes)
	}
	var s Spec
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&s); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return Spec{}, errf(te.Field, "must be a JSON %s, not %s", jsonKind(te.Type.Kind().String()), te.Value)
		}
		return Spec{}, errf("", "malformed JSON: %v", err)
	}
	if dec.More() {
		return Spec{}, errf("", "malformed JSON: data after the object")
	}
	for i := range s.Steps {
		s.Steps[i].Type = strings.ToUpper(strings.TrimSpace(s.Steps[i].Type))
	}
	if err := s.Validate(); err != nil {
		return Spec{}, err
	}
	return s, nil
}

func jsonKind(k string) string {
	switch k {
	case "slice", "array":
		return "array"
	case "struct", "map":
		return "object"
	case "bool":
		return "boolean"
	case "string":
		return "string"
	}
	return "number"
}

// hashRE is the form of a COPY step's filesHash: the SDK's SHA-256 in hex.
var hashRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ValidFilesHash reports whether h has the form of a filesHash. The API
// uses it for `GET /templates/{id}/files/{hash}` too.
func ValidFilesHash(h string) bool { return hashRE.MatchString(h) }

// modeRE is COPY's mode argument: the SDK sends padOctal(mode), 4 octal digits.
var modeRE = regexp.MustCompile(`^[0-7]{3,4}$`)

// Validate checks s as Parse does (step types must already be upper case).
func (s *Spec) Validate() error {
	img, tpl := strings.TrimSpace(s.FromImage), strings.TrimSpace(s.FromTemplate)
	switch {
	case img != "" && tpl != "":
		return errf("fromImage", "fromImage and fromTemplate are both set; give exactly one")
	case img == "" && tpl == "":
		return errf("fromImage", "neither fromImage nor fromTemplate is set; give exactly one")
	case img != "":
		if err := checkRef("fromImage", s.FromImage); err != nil {
			return err
		}
	default:
		if err := checkRef("fromTemplate", s.FromTemplate); err != nil {
			return err
		}
		if s.FromImageRegistry != nil {
			return errf("fromImageRegistry", "registry credentials are only meaningful with fromImage")
		}
	}
	if r := s.FromImageRegistry; r != nil {
		switch r.Type {
		case "registry":
			if r.Username == "" || r.Password == "" {
				return errf("fromImageRegistry", `type "registry" needs both username and password`)
			}
		case "aws", "gcp":
			return errf("fromImageRegistry.type", "%q registry authentication is not supported by cubicle; use type \"registry\" with a user name and password (or a token as password)", r.Type)
		default:
			return errf("fromImageRegistry.type", "unknown registry type %q (want \"registry\")", r.Type)
		}
	}
	if err := checkText("startCmd", s.StartCmd); err != nil {
		return err
	}
	if err := checkText("readyCmd", s.ReadyCmd); err != nil {
		return err
	}
	if len(s.Steps) > MaxSteps {
		return errf("steps", "%d steps is more than the %d allowed", len(s.Steps), MaxSteps)
	}
	for i, st := range s.Steps {
		if err := st.validate(fmt.Sprintf("steps[%d]", i)); err != nil {
			return err
		}
	}
	return nil
}

func (st Step) validate(f string) error {
	for j, a := range st.Args {
		if err := checkText(fmt.Sprintf("%s.args[%d]", f, j), a); err != nil {
			return err
		}
	}
	if st.FilesHash != "" && st.Type != Copy {
		return errf(f+".filesHash", "only a COPY step has files (this step is %s)", st.Type)
	}
	n := len(st.Args)
	args := f + ".args"
	switch st.Type {
	case Run:
		if n < 1 || n > 2 {
			return errf(args, "RUN takes [command] or [command, user], got %d args", n)
		}
		if strings.TrimSpace(st.Args[0]) == "" {
			return errf(args+"[0]", "RUN command is empty")
		}
		if n == 2 {
			if err := checkUser(args+"[1]", st.Args[1]); err != nil {
				return err
			}
		}
	case Copy:
		if n < 2 || n > 4 {
			return errf(args, "COPY takes [src, dest, user?, mode?], got %d args", n)
		}
		if st.FilesHash == "" {
			return errf(f+".filesHash", "COPY needs the filesHash of its uploaded files")
		}
		if !ValidFilesHash(st.FilesHash) {
			return errf(f+".filesHash", "%q is not a files hash (64 lower-case hex digits)", clip(st.FilesHash))
		}
		if err := CheckSource(st.Args[0]); err != nil {
			return errf(args+"[0]", "%v", err)
		}
		if st.Args[1] == "" {
			return errf(args+"[1]", "COPY destination is empty")
		}
		if n >= 3 && st.Args[2] != "" {
			if err := checkOwner(args+"[2]", st.Args[2]); err != nil {
				return err
			}
		}
		if n == 4 && st.Args[3] != "" && !modeRE.MatchString(st.Args[3]) {
			return errf(args+"[3]", "COPY mode %q is not an octal permission like 0755", clip(st.Args[3]))
		}
	case Env:
		if n == 0 || n%2 != 0 {
			return errf(args, "ENV takes key/value pairs [k1, v1, k2, v2, ...], got %d args", n)
		}
		if n/2 > MaxEnvPairs {
			return errf(args, "ENV sets %d variables, more than the %d allowed", n/2, MaxEnvPairs)
		}
		for j := 0; j < n; j += 2 {
			if err := CheckEnvName(st.Args[j]); err != nil {
				return errf(fmt.Sprintf("%s[%d]", args, j), "%v", err)
			}
		}
	case Workdir:
		if n != 1 {
			return errf(args, "WORKDIR takes [path], got %d args", n)
		}
		if strings.TrimSpace(st.Args[0]) == "" {
			return errf(args+"[0]", "WORKDIR path is empty")
		}
	case User:
		if n < 1 || n > 2 {
			return errf(args, "USER takes [name] or [name, sudo], got %d args", n)
		}
		if err := checkUser(args+"[0]", st.Args[0]); err != nil {
			return err
		}
		if n == 2 && st.Args[1] != "true" && st.Args[1] != "false" && st.Args[1] != "" {
			return errf(args+"[1]", "USER's second arg is \"true\" (make the user a sudoer) or \"false\", not %q", clip(st.Args[1]))
		}
	case "":
		return errf(f+".type", "step type is missing (want RUN, COPY, ENV, WORKDIR or USER)")
	default:
		return errf(f+".type", "unknown step type %q (want RUN, COPY, ENV, WORKDIR or USER)", clip(st.Type))
	}
	return nil
}

// CheckSource checks a COPY source as the SDK's validateRelativePath does:
// relative to the context directory and not escaping it (foo/../bar is
// fine, ../foo and /foo are not). Globs are allowed.
func CheckSource(src string) error {
	if src == "" {
		return errors.New("COPY source is empty")
	}
	if strings.HasPrefix(src, "/") || strings.HasPrefix(src, `\`) || (len(src) > 1 && src[1] == ':') {
		return fmt.Errorf("COPY source %q is absolute; it must be a path relative to the context directory", clip(src))
	}
	c := path.Clean(strings.ReplaceAll(src, `\`, "/"))
	if c == ".." || strings.HasPrefix(c, "../") {
		return fmt.Errorf("COPY source %q escapes the context directory", clip(src))
	}
	return nil
}

// CheckEnvName checks an environment variable name: non-empty, no '=',
// no whitespace or control characters (Docker allows dots and dashes, so
// this does not insist on a shell identifier).
func CheckEnvName(k string) error {
	if k == "" {
		return errors.New("environment variable name is empty")
	}
	if len(k) > 256 {
		return fmt.Errorf("environment variable name %q is too long", clip(k))
	}
	for _, r := range k {
		if r == '=' || r <= ' ' || r == 0x7f {
			return fmt.Errorf("environment variable name %q contains %q", clip(k), r)
		}
	}
	return nil
}

// checkUser checks a user name as RUN and USER take it: a name or numeric
// id, optionally ":group". It may hold $VAR references, expanded later.
func checkUser(f, u string) error {
	if u == "" {
		return errf(f, "user name is empty")
	}
	if len(u) > 64 {
		return errf(f, "user name %q is longer than 64 bytes", clip(u))
	}
	for _, r := range u {
		if r <= ' ' || r == 0x7f || r == '/' || r == '"' || r == '\'' || r == '`' {
			return errf(f, "user name %q contains %q", clip(u), r)
		}
	}
	return nil
}

// checkOwner checks COPY's owner, "user" or "user:group".
func checkOwner(f, o string) error {
	u, g, _ := strings.Cut(o, ":")
	if err := checkUser(f, u); err != nil {
		return err
	}
	if strings.Contains(o, ":") {
		return checkUser(f, g)
	}
	return nil
}

// checkRef checks an image reference or template name: printable, no
// spaces, bounded.
func checkRef(f, ref string) error {
	if len(ref) > MaxRefBytes {
		return errf(f, "%d bytes is longer than %d", len(ref), MaxRefBytes)
	}
	for _, r := range ref {
		if r <= ' ' || r == 0x7f || r == utf8.RuneError {
			return errf(f, "%q contains %q", clip(ref), r)
		}
	}
	return nil
}

// checkText checks a command or argument: valid UTF-8 (JSON strings are),
// no NUL (it cannot pass through exec or the environment), bounded.
func checkText(f, s string) error {
	if len(s) > MaxArgBytes {
		return errf(f, "%d bytes is longer than %d", len(s), MaxArgBytes)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return errf(f, "contains a NUL byte")
	}
	return nil
}

// clip shortens a value quoted in an error message.
func clip(s string) string {
	if len(s) <= 80 {
		return s
	}
	i := 77
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "..."
}
