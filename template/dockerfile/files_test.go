package dockerfile

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/template/buildspec"
	"github.com/cubicle-dev/cubicle/template/uploads"
)

// makeContext builds a context directory with the cases the SDK's recipe
// distinguishes: modes, nesting, dotfiles, symlinks to files, directories
// and nowhere, hard links, empty directories, spaces, and .dockerignore
// patterns with and without /**.
func makeContext(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	w := func(rel, body string, mode os.FileMode) {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
	}
	w("app.txt", "hello\n", 0o644)
	w("b.txt", "bee", 0o600)
	w("run.sh", "#!/bin/sh\necho hi\n", 0o755)
	w("src/main.go", "package main\n", 0o644)
	w("src/util.go", "package main // util\n", 0o644)
	w("src/.hidden", "dot", 0o644)
	w("src/sub/deep.txt", "deep", 0o640)
	w("src/with space.txt", "sp", 0o644)
	w("debug.log", "log", 0o644)
	w("src/inner.log", "inner log", 0o644)
	w("node_modules/pkg/index.js", "js", 0o644)
	w("build/out.bin", "bin", 0o755)
	w(".dockerignore", "# comment\n*.log\n\nnode_modules\nbuild/**\n", 0o644)
	os.MkdirAll(filepath.Join(dir, "src/empty"), 0o755)
	os.Symlink("main.go", filepath.Join(dir, "src/link.go"))
	os.Symlink("sub", filepath.Join(dir, "src/sublink"))
	os.Link(filepath.Join(dir, "src/main.go"), filepath.Join(dir, "src/hard.go"))
	return dir
}

var copyCases = []struct{ src, dest string }{
	{"app.txt", "/app/"},
	{"./run.sh", "/usr/local/bin/run"},
	{"src", "/srv"},
	{"src/", "/srv/"},
	{"*.txt", "/t/"},
	{"src/*.go", "/go/"},
	{"src/**/*.txt", "/deep/"},
	{"{app,b}.txt", "/ab/"},
	{"src/sub/deep.txt", "deep.txt"},
	{".", "/all"},
	{"src/link.go", "/l"},
}

// TestHashMatchesSDK runs the e2b SDK itself (Template().copy(...) and
// Template.toJSON, which computes filesHash) over the same context and
// compares every hash; and fromDockerfile over a Dockerfile both sides read
// alike, comparing the whole translated build.
func TestHashMatchesSDK(t *testing.T) {
	node, sdk := needSDK(t)
	// The same recipe in 2.45, the other version cubicle is tested with.
	sdks := []string{sdk}
	if v1 := filepath.Join(filepath.Dir(filepath.Dir(filepath.Dir(sdk))), "e2b-v1", "dist", "index.mjs"); fileExists(v1) {
		sdks = append(sdks, v1)
	}
	for _, sdk := range sdks {
		t.Run(filepath.Base(filepath.Dir(filepath.Dir(sdk))), func(t *testing.T) { hashMatchesSDK(t, node, sdk) })
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func hashMatchesSDK(t *testing.T, node, sdk string) {
	dir := makeContext(t)
	c, err := NewContext(dir)
	if err != nil {
		t.Fatal(err)
	}

	var calls []string
	for _, cc := range copyCases {
		calls = append(calls, fmt.Sprintf(".copy(%q, %q)", cc.src, cc.dest))
	}
	script := fmt.Sprintf(`import { Template } from %q
const t = Template({fileContextPath: %q}).fromImage("alpine")%s
console.log(await Template.toJSON(t, true))
`, sdk, dir, strings.Join(calls, ""))
	var got struct{ Steps []buildspec.Step }
	runNode(t, node, script, &got)
	if len(got.Steps) != len(copyCases) {
		t.Fatalf("SDK made %d steps", len(got.Steps))
	}
	for i, cc := range copyCases {
		mine, err := c.Hash(cc.src, cc.dest)
		if err != nil {
			t.Errorf("COPY %s %s: %v", cc.src, cc.dest, err)
			continue
		}
		if mine != got.Steps[i].FilesHash {
			files, _ := c.Files(cc.src)
			var rels []string
			for _, f := range files {
				rels = append(rels, f.Rel)
			}
			t.Errorf("COPY %s %s: hash %s, SDK %s (files %q)", cc.src, cc.dest, mine, got.Steps[i].FilesHash, rels)
		}
	}

	// Sources that match nothing (or only ignored files) fail on both sides.
	for _, src := range []string{"nothing.txt", "debug.log", "node_modules"} {
		if _, err := c.Hash(src, "/x"); err == nil || !strings.Contains(err.Error(), "no files found") {
			t.Errorf("COPY %s: %v, want no files found", src, err)
		}
	}

	// A Dockerfile the SDK and this parser read alike: the whole build,
	// hashes included, must be the same.
	df := "FROM python:3.12\nENV A=1 B=2\nRUN pip install flask\nCOPY --chown=app:app app.txt src /dst/\nWORKDIR /app\nUSER app\nCMD [\"python\", \"-m\", \"http.server\"]\n"
	script = fmt.Sprintf(`import { Template } from %q
const t = Template({fileContextPath: %q}).fromDockerfile(%q)
console.log(await Template.toJSON(t, true))
`, sdk, dir, df)
	var sdkSpec buildspec.Spec
	runNode(t, node, script, &sdkSpec)
	r, err := Parse([]byte(df), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.HashCopies(&r.Spec); err != nil {
		t.Fatal(err)
	}
	a, _ := json.MarshalIndent(sdkSpec, "", " ")
	b, _ := json.MarshalIndent(r.Spec, "", " ")
	if !bytes.Equal(a, b) {
		t.Errorf("SDK build:\n%s\nours:\n%s", a, b)
	}
}

// TestTarMatchesSDK makes the upload tar with node-tar exactly as the SDK
// does (create with cwd, noDirRecurse, over the matched paths) and compares
// it entry by entry with WriteTar's; then applies ours with the server's
// CopyInto and checks the result.
func TestTarMatchesSDK(t *testing.T) {
	node, sdk := needSDK(t)
	tarMod := filepath.Join(filepath.Dir(filepath.Dir(filepath.Dir(sdk))), "tar", "dist", "esm", "index.js")
	dir := makeContext(t)
	c, err := NewContext(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, cc := range copyCases {
		files, err := c.Files(cc.src)
		if err != nil {
			t.Fatal(err)
		}
		var paths []string
		for _, f := range files {
			paths = append(paths, f.Rel)
		}
		out := filepath.Join(t.TempDir(), "sdk.tar")
		script := fmt.Sprintf(`import { create } from %q
await create({gzip: false, cwd: %q, follow: false, noDirRecurse: true, file: %q}, %s)
console.log("{}")
`, tarMod, dir, out, mustJSON(paths))
		runNode(t, node, script, &struct{}{})
		sdkTar, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		var mine bytes.Buffer
		if err := c.WriteTar(&mine, cc.src, true); err != nil {
			t.Fatal(err)
		}
		a, b := tarEntries(t, sdkTar), tarEntries(t, mine.Bytes())
		if strings.Join(a, "\n") != strings.Join(b, "\n") {
			t.Errorf("COPY %s: node-tar\n%s\nours\n%s", cc.src, strings.Join(a, "\n"), strings.Join(b, "\n"))
		}
		// The server accepts and applies it.
		if err := uploads.Check(bytes.NewReader(mine.Bytes()), uploads.Limits{}); err != nil {
			t.Errorf("COPY %s: the store refuses our tar: %v", cc.src, err)
		}
	}

	// Applying "COPY src /srv" gives the directory's contents under /srv.
	root := t.TempDir()
	var tb bytes.Buffer
	if err := c.WriteTar(&tb, "src", true); err != nil {
		t.Fatal(err)
	}
	if err := uploads.CopyInto(root, &tb, uploads.CopyOptions{Src: "src", Dest: "/srv", UID: os.Geteuid(), GID: os.Getegid()}); err != nil {
		t.Fatal(err)
	}
	for rel, want := range map[string]string{"srv/main.go": "package main\n", "srv/hard.go": "package main\n", "srv/sub/deep.txt": "deep", "srv/.hidden": "dot", "srv/with space.txt": "sp"} {
		if b, err := os.ReadFile(filepath.Join(root, rel)); err != nil || string(b) != want {
			t.Errorf("%s: %q, %v", rel, b, err)
		}
	}
	if l, err := os.Readlink(filepath.Join(root, "srv/link.go")); err != nil || l != "main.go" {
		t.Errorf("srv/link.go: %q, %v", l, err)
	}
	// "*.log" in .dockerignore is matched against the whole relative
	// path (no basename matching), so src/inner.log is not ignored: the
	// SDK's hash agrees (TestHashMatchesSDK).
	if _, err := os.Lstat(filepath.Join(root, "srv/inner.log")); err != nil {
		t.Error(err)
	}
}

// tarEntries lists a tar's entries with every field the server uses.
func tarEntries(t *testing.T, data []byte) []string {
	t.Helper()
	var r io.Reader = bytes.NewReader(data)
	if len(data) > 1 && data[0] == 0x1f && data[1] == 0x8b {
		zr, err := gzip.NewReader(r)
		if err != nil {
			t.Fatal(err)
		}
		r = zr
	}
	tr := tar.NewReader(r)
	var out []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		out = append(out, fmt.Sprintf("%s type=%c mode=%o uid=%d gid=%d size=%d link=%q mtime=%d body=%q",
			h.Name, h.Typeflag, h.Mode, h.Uid, h.Gid, h.Size, h.Linkname, h.ModTime.Truncate(time.Second).Unix(), body))
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// needSDK finds node and the e2b SDK installed by `npm ci` in e2e/sdk.
func needSDK(t *testing.T) (node, sdk string) {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed: cannot run the e2b SDK's own hash")
	}
	sdk, _ = filepath.Abs("../../e2e/sdk/node_modules/e2b/dist/index.mjs")
	if _, err := os.Stat(sdk); err != nil {
		t.Skip("the e2b SDK is not installed (cd e2e/sdk && npm ci)")
	}
	return node, sdk
}

func runNode(t *testing.T, node, script string, out any) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "probe.mjs")
	if err := os.WriteFile(f, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, f)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v\n%s", err, stderr.String())
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("node printed %q: %v", b, err)
	}
}
