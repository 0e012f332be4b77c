package codeinterp

import (
	"bytes"
	"encoding/json"
	"errors"
	"maps"
	"path"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestParseExecute(t *testing.T) {
	tests := []struct {
		body    string
		want    execRequest
		wantErr string
	}{
		{`{"code":"1+1"}`, execRequest{code: "1+1", language: langPython}, ""},
		{`{"code":"","language":"BASH "}`, execRequest{code: "", language: langBash}, ""},
		{`{"code":"x","context_id":"abc"}`, execRequest{code: "x", contextID: "abc"}, ""},
		{`{"code":"x","context_id":null,"language":null}`, execRequest{code: "x", language: langPython}, ""},
		{`{"code":"x","context_id":"","language":"python"}`, execRequest{code: "x", language: langPython}, ""},
		{`{"code":"x","env_vars":{"A":"b"},"future_field":1}`, execRequest{code: "x", language: langPython, env: map[string]string{"A": "b"}}, ""},
		{`{"code":"x","context_id":"a","language":"python"}`, execRequest{}, "Only one of context_id or language"},
		{`{"context_id":"a"}`, execRequest{}, "code is required"},
		{`{"code":null}`, execRequest{}, "code is required"},
		{`null`, execRequest{}, "code is required"},
		{`{"code":"x","language":"fortran"}`, execRequest{}, "not supported"},
		{`{"code":"x","env_vars":{"":"v"}}`, execRequest{}, "invalid name"},
		{`{"code":"x","env_vars":{"K":"a\u0000b"}}`, execRequest{}, "NUL"},
		{`{"code":"x","env_vars":{"K":1}}`, execRequest{}, "JSON"},
		{`{"code":"x"}]`, execRequest{}, "trailing"},
		{`[]`, execRequest{}, "JSON"},
		{``, execRequest{}, "JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.body, func(t *testing.T) {
			got, err := parseExecute([]byte(tt.body))
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want ErrBadRequest containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.code != tt.want.code || got.contextID != tt.want.contextID || got.language != tt.want.language || !maps.Equal(got.env, tt.want.env) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseCreateContext(t *testing.T) {
	tests := []struct {
		body    string
		want    contextRequest
		wantErr string
	}{
		{``, contextRequest{language: langPython}, ""},
		{`{}`, contextRequest{language: langPython}, ""},
		{`{"language":"bash","cwd":"/tmp/../home/"}`, contextRequest{language: langBash, cwd: "/home"}, ""},
		{`{"language":null,"cwd":null}`, contextRequest{language: langPython}, ""},
		{`{"cwd":"tmp"}`, contextRequest{}, "absolute"},
		{`{"language":"java"}`, contextRequest{}, "not supported"},
		{`{"language":3}`, contextRequest{}, "JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.body, func(t *testing.T) {
			got, err := parseCreateContext([]byte(tt.body))
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want ErrBadRequest containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestNewResult(t *testing.T) {
	bundle := map[string]json.RawMessage{
		"text/plain":        json.RawMessage(`"'quoted'"`),
		"text/html":         json.RawMessage(`["<b>", "x</b>"]`),
		"image/png":         json.RawMessage(`"iVBOR"`),
		"application/json":  json.RawMessage(`{"a":1}`),
		"e2b/chart":         json.RawMessage(`{"type":"line"}`),
		"application/x-new": json.RawMessage(`"v"`),
	}
	r := newResult(true, bundle)
	if r.Text != "quoted" || r.HTML != "<b>x</b>" || r.PNG != "iVBOR" || string(r.JSON) != `{"a":1}` ||
		string(r.Chart) != `{"type":"line"}` || string(r.Extra["application/x-new"]) != `"v"` || !r.IsMain {
		t.Errorf("result %+v", r)
	}
	b, _ := json.Marshal(newResult(false, map[string]json.RawMessage{"text/plain": json.RawMessage(`"1"`)}))
	if string(b) != `{"type":"result","is_main_result":false,"text":"1"}` {
		t.Errorf("encoded %s", b)
	}
}

func TestWireRoundTrip(t *testing.T) {
	s := signer{key: []byte("secret")}
	frames, id, err := s.encode("sess", "execute_request", map[string]string{"code": "1"})
	if err != nil {
		t.Fatal(err)
	}
	// A kernel's reply carries routing frames before the delimiter.
	reply := append([][]byte{[]byte("route")}, frames...)
	m, err := s.decode(reply)
	if err != nil {
		t.Fatal(err)
	}
	if m.Header.MsgID != id || m.Header.Session != "sess" || m.Header.Version != protocolVersion || string(m.Content) != `{"code":"1"}` {
		t.Errorf("decoded %+v", m)
	}
	tests := []struct {
		name   string
		frames [][]byte
		want   error
	}{
		{"other key", frames, errBadSignature},
		{"no delimiter", frames[1:], errNoDelimiter},
		{"short", frames[:4], errShortMessage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dec := s
			if tt.want == errBadSignature {
				dec = signer{key: []byte("other")}
			}
			if _, err := dec.decode(tt.frames); !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestMarkerScanner(t *testing.T) {
	marker := []byte("\x1eMARK\x1e")
	tests := []struct {
		name   string
		chunks []string
		want   string // text with markers shown as |
	}{
		{"plain", []string{"abc"}, "abc"},
		{"marker alone", []string{"\x1eMARK\x1e"}, "|"},
		{"marker split", []string{"ab\x1eMA", "RK\x1ecd"}, "ab|cd"},
		{"false start", []string{"x\x1eMA", "Y"}, "x\x1eMAY"},
		{"two markers", []string{"a\x1eMARK\x1eb\x1eMARK\x1e"}, "a|b|"},
		{"rune split", []string{"\xc3", "\xa9"}, "é"},
		{"rune split across three", []string{"\xe2", "\x82", "\xac!"}, "€!"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sc := markerScanner{marker: marker}
			var out strings.Builder
			for _, c := range tt.chunks {
				sc.scan([]byte(c), func(b []byte) {
					if !utf8.Valid(b) {
						t.Errorf("emitted invalid UTF-8 %q", b)
					}
					out.Write(b)
				}, func() { out.WriteByte('|') })
			}
			out.Write(sc.flush())
			if out.String() != tt.want {
				t.Errorf("got %q, want %q", out.String(), tt.want)
			}
		})
	}
}

func FuzzParseExecute(f *testing.F) {
	for _, s := range []string{`{"code":"1"}`, `{"code":"x","context_id":"a","language":"python"}`,
		`{"code":"x","env_vars":{"A":"b"}}`, `{"code":"x","language":" BaSh"}`, `null`, `{"code":"\u0000"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := parseExecute(body)
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error not marked ErrBadRequest: %v", err)
			}
			return
		}
		if (r.contextID == "") == (r.language == "") {
			t.Fatalf("exactly one of context and language must be set: %+v", r)
		}
		if r.language != "" && r.language != langPython && r.language != langBash {
			t.Fatalf("unsupported language accepted: %q", r.language)
		}
		if validEnv(r.env) != nil {
			t.Fatalf("invalid env accepted: %q", r.env)
		}
	})
}

func FuzzParseCreateContext(f *testing.F) {
	for _, s := range []string{``, `{}`, `{"language":"bash","cwd":"/tmp"}`, `{"cwd":"rel"}`, `{"cwd":"/a/../.."}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := parseCreateContext(body)
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error not marked ErrBadRequest: %v", err)
			}
			return
		}
		if r.language != langPython && r.language != langBash {
			t.Fatalf("unsupported language accepted: %q", r.language)
		}
		if r.cwd != "" && (!path.IsAbs(r.cwd) || path.Clean(r.cwd) != r.cwd || strings.ContainsRune(r.cwd, 0)) {
			t.Fatalf("unclean cwd accepted: %q", r.cwd)
		}
	})
}

// FuzzDecodeMessage feeds the wire decoder frames as a kernel (or anything
// else that reached its socket) might send them.
func FuzzDecodeMessage(f *testing.F) {
	s := signer{key: []byte("k")}
	frames, _, _ := s.encode("s", "status", map[string]string{"execution_state": "idle"})
	f.Add(bytes.Join(frames, []byte{0}))
	f.Add([]byte("<IDS|MSG>\x00\x00{}\x00{}\x00{}\x00{}"))
	f.Fuzz(func(t *testing.T, joined []byte) {
		parts := bytes.Split(joined, []byte{0})
		for _, key := range [][]byte{nil, []byte("k")} {
			m, err := signer{key: key}.decode(parts)
			if err == nil && !json.Valid(m.Content) {
				t.Fatalf("accepted content that is not JSON: %q", m.Content)
			}
		}
	})
}

// FuzzMarkerScanner checks that whatever the chunking, the scanner emits
// the input with each marker replaced, never splitting a character.
func FuzzMarkerScanner(f *testing.F) {
	f.Add("hello \x1eM\x1e world é", 3)
	f.Add("\x1e\x1eM\x1e\x1eM", 1)
	f.Fuzz(func(t *testing.T, in string, step int) {
		if step <= 0 || step > 64 {
			step = 7
		}
		marker := []byte("\x1eM\x1e")
		sc := markerScanner{marker: marker}
		var out bytes.Buffer
		for i := 0; i < len(in); i += step {
			sc.scan([]byte(in[i:min(i+step, len(in))]), func(b []byte) {
				if utf8.Valid([]byte(in)) && !utf8.Valid(b) {
					t.Fatalf("split a character: %q", b)
				}
				out.Write(b)
			}, func() { out.WriteString("<m>") })
		}
		out.Write(sc.flush())
		if want := strings.ReplaceAll(in, string(marker), "<m>"); out.String() != want {
			t.Fatalf("scan(%q, step %d) = %q, want %q", in, step, out.String(), want)
		}
	})
}
