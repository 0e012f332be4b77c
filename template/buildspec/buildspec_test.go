package buildspec

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

const hashA = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// sdkBody is what the e2b JS SDK 2.51 sends for
//
//	Template().fromImage('python:3.12').copy('app', '/app', {mode: 0o755})
//	  .runCmd('pip install x', {user: 'root'}).setEnvs({A: '1'})
//	  .setWorkdir('/app').setUser('user').setStartCmd('python app.py', waitForPort(8000))
//
// (Template.toJSON output, abridged hash).
const sdkBody = `{
  "startCmd": "python app.py",
  "readyCmd": "[ -n \"$(ss -Htuln sport = :8000)\" ]",
  "steps": [
    {"type": "COPY", "args": ["app", "/app", "", "0755"], "force": false, "filesHash": "` + hashA + `"},
    {"type": "RUN", "args": ["pip install x", "root"], "force": false},
    {"type": "ENV", "args": ["A", "1"], "force": false},
    {"type": "WORKDIR", "args": ["/app"], "force": false},
    {"type": "USER", "args": ["user"], "force": false}
  ],
  "force": false,
  "fromImage": "python:3.12"
}`

func TestParseSDKBody(t *testing.T) {
	s, err := Parse([]byte(sdkBody))
	if err != nil {
		t.Fatal(err)
	}
	if s.FromImage != "python:3.12" || s.StartCmd != "python app.py" || len(s.Steps) != 5 {
		t.Fatalf("parsed %+v", s)
	}
	if s.Steps[0].FilesHash != hashA || s.Steps[0].Args[3] != "0755" {
		t.Fatalf("COPY step %+v", s.Steps[0])
	}
	// The SDK's client-side COPY options and unknown future fields pass.
	extra := strings.Replace(sdkBody, `"force": false, "filesHash"`, `"force": true, "forceUpload": true, "gzip": true, "resolveSymlinks": false, "somethingNew": 1, "filesHash"`, 1)
	s, err = Parse([]byte(extra))
	if err != nil {
		t.Fatal(err)
	}
	if !s.Steps[0].Force || s.Steps[0].Gzip == nil || !*s.Steps[0].Gzip {
		t.Fatalf("COPY step %+v", s.Steps[0])
	}
	// Lower-case types are accepted and normalized.
	s, err = Parse([]byte(`{"fromTemplate":"base","steps":[{"type":"run","args":["true"]}]}`))
	if err != nil || s.Steps[0].Type != Run {
		t.Fatalf("got %+v, %v", s, err)
	}
}

func TestParseRefuses(t *testing.T) {
	step := func(s string) string { return `{"fromImage":"alpine","steps":[` + s + `]}` }
	for _, tc := range []struct {
		name, body, want string
	}{
		{"empty", ``, "body is empty"},
		{"not json", `{`, "malformed JSON"},
		{"trailing", `{"fromImage":"a"} {}`, "data after"},
		{"wrong type", `{"fromImage":"a","steps":{}}`, "steps: must be a JSON array"},
		{"args not strings", step(`{"type":"RUN","args":[1]}`), "must be a JSON string"},
		{"neither base", `{"steps":[]}`, "neither fromImage nor fromTemplate"},
		{"both bases", `{"fromImage":"a","fromTemplate":"b"}`, "both set"},
		{"blank base", `{"fromImage":"  "}`, "neither"},
		{"space in image", `{"fromImage":"a b"}`, "fromImage"},
		{"huge image", `{"fromImage":"` + strings.Repeat("a", 600) + `"}`, "longer than"},
		{"registry with template", `{"fromTemplate":"b","fromImageRegistry":{"type":"registry","username":"u","password":"p"}}`, "only meaningful with fromImage"},
		{"registry no password", `{"fromImage":"a","fromImageRegistry":{"type":"registry","username":"u"}}`, "username and password"},
		{"aws registry", `{"fromImage":"a","fromImageRegistry":{"type":"aws"}}`, "not supported by cubicle"},
		{"odd registry", `{"fromImage":"a","fromImageRegistry":{"type":"ftp"}}`, "unknown registry type"},
		{"no type", step(`{"args":["x"]}`), "step type is missing"},
		{"unknown type", step(`{"type":"HEALTHCHECK","args":["x"]}`), `unknown step type "HEALTHCHECK"`},
		{"run no args", step(`{"type":"RUN"}`), "RUN takes"},
		{"run three args", step(`{"type":"RUN","args":["a","b","c"]}`), "RUN takes"},
		{"run blank", step(`{"type":"RUN","args":["  "]}`), "RUN command is empty"},
		{"run bad user", step(`{"type":"RUN","args":["x","a b"]}`), "user name"},
		{"run nul", step(`{"type":"RUN","args":["a\u0000b"]}`), "NUL"},
		{"copy no hash", step(`{"type":"COPY","args":["a","/b"]}`), "filesHash"},
		{"copy bad hash", step(`{"type":"COPY","args":["a","/b"],"filesHash":"xyz"}`), "not a files hash"},
		{"copy upper hash", step(`{"type":"COPY","args":["a","/b"],"filesHash":"` + strings.ToUpper(hashA) + `"}`), "not a files hash"},
		{"copy one arg", step(`{"type":"COPY","args":["a"],"filesHash":"` + hashA + `"}`), "COPY takes"},
		{"copy five args", step(`{"type":"COPY","args":["a","b","","","x"],"filesHash":"` + hashA + `"}`), "COPY takes"},
		{"copy absolute", step(`{"type":"COPY","args":["/etc","/b"],"filesHash":"` + hashA + `"}`), "absolute"},
		{"copy escape", step(`{"type":"COPY","args":["a/../../x","/b"],"filesHash":"` + hashA + `"}`), "escapes"},
		{"copy dotdot", step(`{"type":"COPY","args":["..","/b"],"filesHash":"` + hashA + `"}`), "escapes"},
		{"copy empty dest", step(`{"type":"COPY","args":["a",""],"filesHash":"` + hashA + `"}`), "destination is empty"},
		{"copy bad mode", step(`{"type":"COPY","args":["a","/b","","rwx"],"filesHash":"` + hashA + `"}`), "octal"},
		{"copy bad owner", step(`{"type":"COPY","args":["a","/b","u:g h",""],"filesHash":"` + hashA + `"}`), "user name"},
		{"hash on run", step(`{"type":"RUN","args":["x"],"filesHash":"` + hashA + `"}`), "only a COPY step"},
		{"env odd", step(`{"type":"ENV","args":["A","1","B"]}`), "key/value pairs"},
		{"env none", step(`{"type":"ENV","args":[]}`), "key/value pairs"},
		{"env empty key", step(`{"type":"ENV","args":["","1"]}`), "name is empty"},
		{"env eq key", step(`{"type":"ENV","args":["A=B","1"]}`), `contains '='`},
		{"workdir two", step(`{"type":"WORKDIR","args":["/a","/b"]}`), "WORKDIR takes"},
		{"workdir empty", step(`{"type":"WORKDIR","args":[""]}`), "WORKDIR path is empty"},
		{"user none", step(`{"type":"USER","args":[]}`), "USER takes"},
		{"user empty", step(`{"type":"USER","args":[""]}`), "user name is empty"},
		{"user sudo junk", step(`{"type":"USER","args":["u","yes"]}`), `"true"`},
		{"start nul", `{"fromImage":"a","startCmd":"a\u0000"}`, "startCmd: contains a NUL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.body))
			if err == nil {
				t.Fatalf("accepted %s", tc.body)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("%v does not wrap ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
		})
	}
	// Too many steps and a too-large argument.
	var steps []string
	for range MaxSteps + 1 {
		steps = append(steps, `{"type":"RUN","args":["true"]}`)
	}
	if _, err := Parse([]byte(step(strings.Join(steps, ",")))); err == nil || !strings.Contains(err.Error(), "steps allowed") && !strings.Contains(err.Error(), "allowed") {
		t.Fatalf("too many steps: %v", err)
	}
	big, _ := json.Marshal(strings.Repeat("x", MaxArgBytes+1))
	if _, err := Parse([]byte(step(`{"type":"RUN","args":[` + string(big) + `]}`))); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("huge arg: %v", err)
	}
}

func TestCheckSource(t *testing.T) {
	for src, ok := range map[string]bool{
		"foo": true, "./foo": true, "foo/bar": true, "foo/../bar": true, "*.txt": true, ".": true,
		"": false, "/abs": false, "..": false, "../x": false, "./foo/../../x": false, `C:\x`: false, `..\x`: false,
	} {
		if err := CheckSource(src); (err == nil) != ok {
			t.Errorf("CheckSource(%q) = %v, want ok=%v", src, err, ok)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(sdkBody))
	f.Add([]byte(`{"fromTemplate":"base","steps":[{"type":"ENV","args":["A","${B:-x}"]}]}`))
	f.Add([]byte(`{"fromImage":"a","steps":[{"type":"COPY","args":["a","b"],"filesHash":"` + hashA + `"}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		s, err := Parse(body)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		// What Parse accepts re-validates, round-trips, and can be applied
		// and keyed without a panic.
		if err := s.Validate(); err != nil {
			t.Fatalf("accepted spec fails Validate: %v", err)
		}
		again, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Parse(again); err != nil {
			t.Fatalf("re-encoded spec refused: %v\n%s", err, again)
		}
		var st State
		key := BaseKey("image:" + s.FromImage)
		for _, step := range s.Steps {
			key = StepKey(key, st, step, "")
			if next, err := st.Apply(step); err == nil {
				st = next
			}
		}
		_ = FinalKey(key, st, s.StartCmd, s.ReadyCmd)
	})
}
