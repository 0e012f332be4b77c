package codeinterp

// Request bodies of the HTTP API and their validation. The parsers take the
// raw body so that fuzzing reaches everything a client controls.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
)

// Languages a context can be made for.
const (
	langPython = "python"
	langBash   = "bash"
)

// ErrBadRequest marks a request the client must change: the server answers
// 400 with the error's text.
var ErrBadRequest = errors.New("bad request")

// maxBody bounds a request body. Cells of several MiB (inlined data) are
// plausible; more is a mistake or an attack.
const maxBody = 32 << 20

// executeBody is POST /execute's body as the SDK sends it. context_id and
// language are pointers because the Python SDK sends null for "not given".
type executeBody struct {
	Code      *string           `json:"code"`
	ContextID *string           `json:"context_id"`
	Language  *string           `json:"language"`
	EnvVars   map[string]string `json:"env_vars"`
}

// execRequest is a validated POST /execute.
type execRequest struct {
	code      string
	contextID string // "" means: the default context of language
	language  string // normalized; "" when contextID is set
	env       map[string]string
}

// parseExecute validates a POST /execute body.
func parseExecute(body []byte) (execRequest, error) {
	var b executeBody
	if err := decodeStrict(body, &b); err != nil {
		return execRequest{}, err
	}
	if b.Code == nil {
		return execRequest{}, fmt.Errorf("%w: code is required", ErrBadRequest)
	}
	ctxID, lang := deref(b.ContextID), deref(b.Language)
	if ctxID != "" && lang != "" {
		return execRequest{}, fmt.Errorf("%w: Only one of context_id or language can be provided", ErrBadRequest)
	}
	r := execRequest{code: *b.Code, contextID: ctxID, env: b.EnvVars}
	if ctxID == "" {
		var err error
		if r.language, err = normalizeLanguage(lang); err != nil {
			return execRequest{}, err
		}
	}
	if err := validEnv(b.EnvVars); err != nil {
		return execRequest{}, err
	}
	return r, nil
}

// contextBody is POST /contexts's body.
type contextBody struct {
	Language *string `json:"language"`
	Cwd      *string `json:"cwd"`
}

// contextRequest is a validated POST /contexts.
type contextRequest struct {
	language string
	cwd      string // "" means the server's default
}

// parseCreateContext validates a POST /contexts body. An empty body is a
// request for a Python context in the default directory.
func parseCreateContext(body []byte) (contextRequest, error) {
	var b contextBody
	if len(bytes.TrimSpace(body)) > 0 {
		if err := decodeStrict(body, &b); err != nil {
			return contextRequest{}, err
		}
	}
	lang, err := normalizeLanguage(deref(b.Language))
	if err != nil {
		return contextRequest{}, err
	}
	cwd := deref(b.Cwd)
	if cwd != "" {
		if !path.IsAbs(cwd) || strings.ContainsRune(cwd, 0) {
			return contextRequest{}, fmt.Errorf("%w: cwd %q must be an absolute path", ErrBadRequest, cwd)
		}
		cwd = path.Clean(cwd)
	}
	return contextRequest{language: lang, cwd: cwd}, nil
}

// normalizeLanguage maps what a client may send to a supported language,
// as E2B's server does ("" is Python, case and spaces do not matter).
func normalizeLanguage(lang string) (string, error) {
	l := strings.ToLower(strings.TrimSpace(lang))
	switch l {
	case "", "python", "python3":
		return langPython, nil
	case "bash", "sh", "shell":
		return langBash, nil
	}
	return "", fmt.Errorf("%w: language %q is not supported here (supported: python, bash)", ErrBadRequest, lang)
}

// validEnv refuses names and values no process environment can hold.
func validEnv(env map[string]string) error {
	for k, v := range env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return fmt.Errorf("%w: env_vars: invalid name %q", ErrBadRequest, k)
		}
		if strings.ContainsRune(v, 0) {
			return fmt.Errorf("%w: env_vars: value of %s contains a NUL byte", ErrBadRequest, k)
		}
	}
	return nil
}

// decodeStrict decodes one JSON object into v, refusing trailing data.
// Unknown fields are ignored: newer SDKs may send more.
func decodeStrict(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: body is not the expected JSON object: %v", ErrBadRequest, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("%w: trailing data after the JSON object", ErrBadRequest)
	}
	return nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
