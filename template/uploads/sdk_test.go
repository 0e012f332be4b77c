package uploads

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// TestSDKBuildRoundTrip lets the real e2b SDK (2.51 and 2.45) run
// Template.build against the smallest server that answers its template
// endpoints with this package and buildspec: the SDK's build body must
// parse, its uploaded tars must pass Put, and each COPY, applied with
// ApplyCopy, must give the files. It pins the wire facts the API relies
// on: the request shapes, the tar the SDK PUTs, and the status polling.
func TestSDKBuildRoundTrip(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed: cannot run the e2b SDK")
	}
	mods, _ := filepath.Abs("../../e2e/sdk/node_modules")
	for _, pkg := range []string{"e2b", "e2b-v1"} {
		sdk := filepath.Join(mods, pkg, "dist", "index.mjs")
		if _, err := os.Stat(sdk); err != nil {
			t.Skipf("the e2b SDK is not installed (cd e2e/sdk && npm ci): %v", err)
		}
		t.Run(pkg, func(t *testing.T) { sdkRoundTrip(t, node, sdk) })
	}
}

func sdkRoundTrip(t *testing.T, node, sdk string) {
	store, err := New(t.TempDir(), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu       sync.Mutex
		spec     buildspec.Spec
		polls    []string
		requests []string
		puts     int
	)
	logs := []map[string]string{
		{"timestamp": "2026-01-01T00:00:00Z", "level": "info", "message": "step 1"},
		{"timestamp": "2026-01-01T00:00:01Z", "level": "info", "message": "step 2"},
	}
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v)
	}
	var srvURL string
	mux.HandleFunc("POST /v3/templates", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		requests = append(requests, string(b))
		mu.Unlock()
		reply(w, 202, map[string]any{"templateID": "tpl1", "buildID": "bld1", "names": []string{"demo"}, "tags": []string{"default"}, "aliases": []string{}, "public": false})
	})
	mux.HandleFunc("GET /templates/tpl1/files/{hash}", func(w http.ResponseWriter, r *http.Request) {
		h := r.PathValue("hash")
		if !buildspec.ValidFilesHash(h) {
			reply(w, 400, map[string]any{"code": 400, "message": "bad hash"})
			return
		}
		reply(w, 201, map[string]any{"present": store.Has(h), "url": srvURL + "/upload/" + h})
	})
	mux.HandleFunc("PUT /upload/{hash}", func(w http.ResponseWriter, r *http.Request) {
		if _, err := store.Put(r.PathValue("hash"), r.Body); err != nil {
			t.Errorf("Put of the SDK's upload: %v", err)
			http.Error(w, err.Error(), 400)
			return
		}
		mu.Lock()
		puts++
		mu.Unlock()
	})
	mux.HandleFunc("POST /v2/templates/tpl1/builds/bld1", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s, err := buildspec.Parse(b)
		if err != nil {
			t.Errorf("Parse of the SDK's build: %v\n%s", err, b)
			reply(w, 400, map[string]any{"code": 400, "message": err.Error()})
			return
		}
		mu.Lock()
		spec = s
		mu.Unlock()
		w.WriteHeader(202)
	})
	mux.HandleFunc("GET /templates/tpl1/builds/bld1/status", func(w http.ResponseWriter, r *http.Request) {
		off := 0
		fmt.Sscan(r.URL.Query().Get("logsOffset"), &off)
		mu.Lock()
		polls = append(polls, r.URL.RawQuery)
		mu.Unlock()
		entries := []map[string]string{}
		if off < len(logs) {
			entries = logs[off:]
		}
		reply(w, 200, map[string]any{"buildID": "bld1", "templateID": "tpl1", "status": "ready", "logEntries": entries, "logs": []string{}})
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	srvURL = srv.URL

	ctx := t.TempDir()
	os.MkdirAll(filepath.Join(ctx, "src/sub"), 0o755)
	os.WriteFile(filepath.Join(ctx, "src/a.py"), []byte("print(1)\n"), 0o644)
	os.WriteFile(filepath.Join(ctx, "src/sub/b.txt"), []byte("b"), 0o600)
	os.WriteFile(filepath.Join(ctx, "app.txt"), []byte("app"), 0o644)
	script := fmt.Sprintf(`import { Template, waitForPort } from %q
const t = Template({fileContextPath: %q})
  .fromImage("python:3.12")
  .copy("src", "/srv")
  .copy("app.txt", "/opt/", {mode: 0o755, user: "root"})
  .copy("app.txt", "/opt/", {forceUpload: true})
  .runCmd(["pip install x", "echo done"], {user: "root"})
  .setEnvs({A: "1", B: "two words"})
  .setWorkdir("/srv")
  .setUser("user")
  .setStartCmd("python -m http.server 8000", waitForPort(8000))
const seen = []
await Template.build(t, "demo", {onBuildLogs: (e) => seen.push(e.message)})
console.log(JSON.stringify(seen))
`, sdk, ctx)
	f := filepath.Join(t.TempDir(), "build.mjs")
	os.WriteFile(f, []byte(script), 0o644)
	cmd := exec.Command(node, f)
	cmd.Env = append(os.Environ(), "E2B_API_URL="+srv.URL, "E2B_API_KEY=e2b_"+strings.Repeat("0", 40), "E2B_DOMAIN=cubicle.localhost")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("Template.build: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "step 1") || !strings.Contains(string(out), "step 2") {
		t.Errorf("the SDK did not pass on the build logs: %s", out)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("create body %s; status polls %q; uploads %d", requests, polls, puts)

	if spec.FromImage != "python:3.12" || spec.StartCmd != "python -m http.server 8000" || !strings.Contains(spec.ReadyCmd, ":8000") {
		t.Errorf("spec %+v", spec)
	}
	var got []string
	for _, st := range spec.Steps {
		got = append(got, st.Type+" "+strings.Join(st.Args, "|"))
	}
	want := []string{"COPY src|/srv||", "COPY app.txt|/opt/|root|0755", "COPY app.txt|/opt/||", "RUN pip install x && echo done|root", "ENV A|1|B|two words", "WORKDIR /srv", "USER user"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("steps\n%q\nwant\n%q", got, want)
	}
	if spec.Steps[2].ForceUpload == nil || !*spec.Steps[2].ForceUpload || !spec.Steps[2].Force {
		t.Errorf("forceUpload step %+v", spec.Steps[2])
	}

	// Apply every COPY to a root filesystem from the stored uploads.
	root := t.TempDir()
	os.MkdirAll(root+"/etc", 0o755)
	os.WriteFile(root+"/etc/passwd", []byte(fmt.Sprintf("root:x:%d:%d:root:/root:/bin/sh\n", os.Geteuid(), os.Getegid())), 0o644)
	var state buildspec.State
	for _, st := range spec.Steps {
		if st.Type == buildspec.Copy {
			f, _, err := store.Open(st.FilesHash)
			if err != nil {
				t.Fatalf("COPY %s: %v", st.Args[0], err)
			}
			err = ApplyCopy(root, state, st, f, Limits{})
			f.Close()
			if err != nil {
				t.Fatalf("COPY %s: %v", st.Args[0], err)
			}
		}
		if state, err = state.Apply(st); err != nil {
			t.Fatal(err)
		}
	}
	for rel, want := range map[string]string{"srv/a.py": "print(1)\n", "srv/sub/b.txt": "b", "opt/app.txt": "app"} {
		if b, err := os.ReadFile(filepath.Join(root, rel)); err != nil || string(b) != want {
			t.Errorf("%s: %q, %v", rel, b, err)
		}
	}
}

// TestSDKBuildError pins what the SDK makes of a failed build: status
// "error" with reason {message, step, logEntries} becomes a BuildError
// carrying reason.message, after the SDK has drained the log entries.
func TestSDKBuildError(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed: cannot run the e2b SDK")
	}
	sdk, _ := filepath.Abs("../../e2e/sdk/node_modules/e2b/dist/index.mjs")
	if _, err := os.Stat(sdk); err != nil {
		t.Skip("the e2b SDK is not installed (cd e2e/sdk && npm ci)")
	}
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("POST /v3/templates", func(w http.ResponseWriter, r *http.Request) {
		reply(w, 202, map[string]any{"templateID": "tpl1", "buildID": "bld1", "names": []string{"demo"}, "tags": []string{}, "aliases": []string{}, "public": false})
	})
	mux.HandleFunc("POST /v2/templates/tpl1/builds/bld1", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(202) })
	mux.HandleFunc("GET /templates/tpl1/builds/bld1/status", func(w http.ResponseWriter, r *http.Request) {
		entries := []map[string]string{}
		if r.URL.Query().Get("logsOffset") == "0" {
			entries = append(entries, map[string]string{"timestamp": "2026-01-01T00:00:00Z", "level": "error", "message": "false: exit 1", "step": "1"})
		}
		reply(w, 200, map[string]any{"buildID": "bld1", "templateID": "tpl1", "status": "error", "logEntries": entries, "logs": []string{},
			"reason": map[string]any{"message": "step 1 (RUN false) failed: exit status 1", "step": "1"}})
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	script := fmt.Sprintf(`import { Template } from %q
try {
  await Template.build(Template().fromImage("alpine").runCmd("false"), "demo", {onBuildLogs: (e) => console.error(e.message)})
  console.log(JSON.stringify({ok: true}))
} catch (e) {
  console.log(JSON.stringify({name: e.name, message: e.message}))
}
`, sdk)
	f := filepath.Join(t.TempDir(), "fail.mjs")
	os.WriteFile(f, []byte(script), 0o644)
	cmd := exec.Command(node, f)
	cmd.Env = append(os.Environ(), "E2B_API_URL="+srv.URL, "E2B_API_KEY=e2b_"+strings.Repeat("0", 40), "E2B_DOMAIN=cubicle.localhost")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v\n%s", err, stderr.String())
	}
	var got struct{ Name, Message string }
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("node printed %q", out)
	}
	if got.Name != "BuildError" || got.Message != "step 1 (RUN false) failed: exit status 1" {
		t.Errorf("SDK error %+v", got)
	}
	if !strings.Contains(stderr.String(), "false: exit 1") {
		t.Errorf("the failing step's log did not reach onBuildLogs: %s", stderr.String())
	}
}
