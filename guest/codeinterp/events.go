package codeinterp

// The lines of POST /execute's NDJSON stream, field for field what the
// @e2b/code-interpreter SDK's parseOutput reads (dist/index.mjs, 2.8.0).

import (
	"encoding/json"
	"strings"
)

// Event types of the /execute stream.
const (
	typeStdout     = "stdout"
	typeStderr     = "stderr"
	typeResult     = "result"
	typeError      = "error"
	typeExecutions = "number_of_executions"
	typeKeepalive  = "keepalive"
	typeEnd        = "end_of_execution"
)

// streamEvent is a piece of stdout or stderr.
type streamEvent struct {
	Type      string `json:"type"`
	Text      string `json:"text"`
	Timestamp string `json:"timestamp"`
}

// errorEvent is an execution's error. Traceback is one string, as the SDK's
// ExecutionError holds it.
type errorEvent struct {
	Type      string `json:"type"`
	Name      string `json:"name"`
	Value     string `json:"value"`
	Traceback string `json:"traceback"`
}

// countEvent reports the kernel's execution counter for the cell.
type countEvent struct {
	Type  string `json:"type"`
	Count int    `json:"execution_count"`
}

// typeOnly is keepalive and end_of_execution.
type typeOnly struct {
	Type string `json:"type"`
}

// resultEvent is an execute_result (IsMain) or display_data: one MIME bundle
// with each known type under the SDK's name and the rest under extra.
type resultEvent struct {
	Type       string                     `json:"type"`
	IsMain     bool                       `json:"is_main_result"`
	Text       string                     `json:"text,omitempty"`
	HTML       string                     `json:"html,omitempty"`
	Markdown   string                     `json:"markdown,omitempty"`
	SVG        string                     `json:"svg,omitempty"`
	PNG        string                     `json:"png,omitempty"`
	JPEG       string                     `json:"jpeg,omitempty"`
	PDF        string                     `json:"pdf,omitempty"`
	LaTeX      string                     `json:"latex,omitempty"`
	JSON       json.RawMessage            `json:"json,omitempty"`
	JavaScript string                     `json:"javascript,omitempty"`
	Data       json.RawMessage            `json:"data,omitempty"`
	Chart      json.RawMessage            `json:"chart,omitempty"`
	Extra      map[string]json.RawMessage `json:"extra,omitempty"`
}

// mimeFields maps the MIME types the SDK knows to the result field holding
// them. Binary types arrive base64-encoded already (Jupyter's convention).
// e2b/data and e2b/chart are what E2B's own IPython startup scripts emit;
// a user may emit them too.
var mimeFields = map[string]func(*resultEvent) *string{
	"text/plain":             func(r *resultEvent) *string { return &r.Text },
	"text/html":              func(r *resultEvent) *string { return &r.HTML },
	"text/markdown":          func(r *resultEvent) *string { return &r.Markdown },
	"image/svg+xml":          func(r *resultEvent) *string { return &r.SVG },
	"image/png":              func(r *resultEvent) *string { return &r.PNG },
	"image/jpeg":             func(r *resultEvent) *string { return &r.JPEG },
	"application/pdf":        func(r *resultEvent) *string { return &r.PDF },
	"text/latex":             func(r *resultEvent) *string { return &r.LaTeX },
	"application/javascript": func(r *resultEvent) *string { return &r.JavaScript },
}

// newResult converts a Jupyter MIME bundle into the SDK's result shape.
func newResult(isMain bool, bundle map[string]json.RawMessage) resultEvent {
	r := resultEvent{Type: typeResult, IsMain: isMain}
	for mime, raw := range bundle {
		if field, ok := mimeFields[mime]; ok {
			var s string
			if json.Unmarshal(raw, &s) == nil {
				*field(&r) = s
				continue
			}
			// A list of lines is the notebook-file form of a string.
			var lines []string
			if json.Unmarshal(raw, &lines) == nil {
				*field(&r) = strings.Join(lines, "")
				continue
			}
		}
		switch mime {
		case "application/json":
			r.JSON = raw
			continue
		case "e2b/data":
			r.Data = raw
			continue
		case "e2b/chart":
			r.Chart = raw
			continue
		}
		if r.Extra == nil {
			r.Extra = make(map[string]json.RawMessage)
		}
		r.Extra[mime] = raw
	}
	r.Text = unquote(r.Text)
	return r
}

// unquote strips one pair of matching quotes around a repr'd string, as
// E2B's server does, so runCode("'a'") has text "a" and not "'a'".
func unquote(s string) string {
	if len(s) >= 2 && (s[0] == '\'' || s[0] == '"') && s[len(s)-1] == s[0] {
		return s[1 : len(s)-1]
	}
	return s
}
