package template

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// codeInterpreterKeys returns the cache keys BuildCodeInterpreter uses
// with opts: the base rootfs's and its own.
func codeInterpreterKeys(t *testing.T, opts BuildOptions) (base, derived string) {
	t.Helper()
	o, err := opts.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	rec, err := baseRecipe(o)
	if err != nil {
		t.Fatal(err)
	}
	ci := codeInterpreterRecipe{
		Version: codeInterpreterRecipeVersion, Base: rec.key(),
		Packages: codeInterpreterPackages, Script: codeInterpreterScript,
	}
	return rec.key(), ci.key()
}

// TestBuildCodeInterpreterFromSeededCache runs the build against a cache
// that already holds its rootfs: no apt, so it runs in -short mode, and it
// checks what the template promises the orchestrator and the registry.
func TestBuildCodeInterpreterFromSeededCache(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("building a template needs root")
	}
	cacheDir := t.TempDir()
	_, key := codeInterpreterKeys(t, BuildOptions{DataDir: "/unused", CacheDir: cacheDir})
	src := t.TempDir()
	mustMkdir(t, filepath.Join(src, "usr", "lib", "python3", "dist-packages", "ipykernel"))
	mustMkdir(t, filepath.Join(src, "etc"))
	mustWrite(t, filepath.Join(src, "etc", "hostname"), "ci\n")
	mustMkdir(t, filepath.Join(cacheDir, "rootfs"))
	if err := writeArchive(context.Background(), src, filepath.Join(cacheDir, "rootfs", key+".tar"), newProgress(nil, "x")); err != nil {
		t.Fatal(err)
	}
	// The base rootfs must be in the cache too (the build asks for it
	// first); an empty tar stands in, since the derived one is cached.
	base, _ := codeInterpreterKeys(t, BuildOptions{DataDir: "/unused", CacheDir: cacheDir})
	if err := writeArchive(context.Background(), t.TempDir(), filepath.Join(cacheDir, "rootfs", base+".tar"), newProgress(nil, "x")); err != nil {
		t.Fatal(err)
	}

	dataDir := t.TempDir()
	var out bytes.Buffer
	tmpl, outcome, err := buildCodeInterpreter(context.Background(), BuildOptions{DataDir: dataDir, CacheDir: cacheDir, Progress: &out})
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if outcome != outcomeCacheHit || !strings.Contains(out.String(), "[template code-interpreter-v1] ") {
		t.Errorf("outcome %s; progress:\n%s", outcome, out.String())
	}
	reg, _ := Open(dataDir)
	got, err := reg.Get(CodeInterpreterAlias)
	if err != nil {
		t.Fatal(err)
	}
	if got.TemplateID != tmpl.TemplateID || !ValidID(got.TemplateID) || got.TemplateID == BaseID {
		t.Errorf("Get(%q) = %+v, built %+v", CodeInterpreterAlias, got, tmpl)
	}
	want := Template{
		TemplateID: tmpl.TemplateID, Aliases: []string{CodeInterpreterAlias}, BuildID: buildIDFor(key, DefaultEnvdVersion),
		CPUCount: DefaultCPUCount, MemoryMB: 1024, DiskSizeMB: DefaultDiskSizeMB, EnvdVersion: DefaultEnvdVersion,
		CreatedAt: got.CreatedAt, Public: true,
		StartCmd: "/.cubicle/envd codeinterp --port 49999", ReadyCmd: "curl -sf http://127.0.0.1:49999/health",
	}
	if got.TemplateID != want.TemplateID || got.BuildID != want.BuildID || got.MemoryMB != want.MemoryMB ||
		got.StartCmd != want.StartCmd || got.ReadyCmd != want.ReadyCmd || got.DiskSizeMB != want.DiskSizeMB ||
		got.CPUCount != want.CPUCount || !got.Public || len(got.Aliases) != 1 || got.Aliases[0] != CodeInterpreterAlias {
		t.Errorf("template = %+v\nwant       %+v", got, want)
	}
	if _, err := os.Stat(filepath.Join(reg.RootFS(got), "usr", "lib", "python3", "dist-packages", "ipykernel")); err != nil {
		t.Errorf("rootfs not extracted: %v", err)
	}

	again, outcome, err := buildCodeInterpreter(context.Background(), BuildOptions{DataDir: dataDir, CacheDir: cacheDir})
	if err != nil || outcome != outcomeUpToDate || again.TemplateID != tmpl.TemplateID {
		t.Errorf("second build: %s, %v, %+v", outcome, err, again)
	}

	// A template from an older recipe is rebuilt under the same ID, keeping
	// its creation time; the alias stays with it.
	stale := got
	stale.BuildID = "00000000-0000-0000-0000-000000000000"
	if err := reg.Put(stale); err != nil {
		t.Fatal(err)
	}
	replaced, outcome, err := buildCodeInterpreter(context.Background(), BuildOptions{DataDir: dataDir, CacheDir: cacheDir})
	if err != nil || outcome != outcomeCacheHit || replaced.TemplateID != got.TemplateID || !replaced.CreatedAt.Equal(got.CreatedAt) || replaced.BuildID != want.BuildID {
		t.Errorf("rebuild over a stale template: %s, %v, %+v", outcome, err, replaced)
	}
	if list, _ := reg.List(); len(list) != 1 {
		t.Errorf("templates after rebuild: %+v", list)
	}
	assertNoWorkDirs(t, reg)
}

func TestCodeInterpreterRecipeKey(t *testing.T) {
	r := codeInterpreterRecipe{Version: 1, Base: "b", Packages: []string{"p"}, Script: "s"}
	tests := []struct {
		name   string
		change func(*codeInterpreterRecipe)
	}{
		{"base", func(r *codeInterpreterRecipe) { r.Base = "b2" }},
		{"packages", func(r *codeInterpreterRecipe) { r.Packages = []string{"p", "q"} }},
		{"script", func(r *codeInterpreterRecipe) { r.Script = "s2" }},
		{"version", func(r *codeInterpreterRecipe) { r.Version = 2 }},
	}
	for _, tt := range tests {
		c := r
		c.Packages = append([]string(nil), r.Packages...)
		tt.change(&c)
		if c.key() == r.key() {
			t.Errorf("changing %s keeps the cache key", tt.name)
		}
	}
	if r.key() != (codeInterpreterRecipe{Version: 1, Base: "b", Packages: []string{"p"}, Script: "s"}).key() {
		t.Error("equal recipes have different keys")
	}
}

// TestBuildCodeInterpreter builds the real template with apt in a chroot,
// using the machine's shared cache (slow only the first time on a machine),
// and checks that the kernel's Python stack imports in the rootfs.
func TestBuildCodeInterpreter(t *testing.T) {
	if testing.Short() {
		t.Skip("installs Debian's Python data stack with apt (a few minutes the first time on a machine)")
	}
	if os.Geteuid() != 0 {
		t.Skip("chroot needs root")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap is not installed (apt-get install debootstrap)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	var log syncBuffer
	log.t = t
	dataDir := t.TempDir()
	tmpl, outcome, err := buildCodeInterpreter(ctx, BuildOptions{DataDir: dataDir, Progress: &log})
	if err != nil {
		t.Fatalf("build: %v\n%s", err, log.buf.String())
	}
	t.Logf("first build: %s", outcome)
	if tmpl.StartCmd != CodeInterpreterStartCmd || tmpl.MemoryMB != codeInterpreterMemoryMB {
		t.Errorf("template %+v", tmpl)
	}
	reg, _ := Open(dataDir)
	root := reg.RootFS(tmpl)
	imp := exec.CommandContext(ctx, "chroot", root, "python3", "-c", "import ipykernel, numpy, pandas, matplotlib.pyplot, scipy")
	if out, err := imp.CombinedOutput(); err != nil {
		t.Errorf("the data stack does not import in the rootfs: %v\n%s", err, out)
	}
	if fonts, _ := filepath.Glob(filepath.Join(root, "home", "user", ".cache", "matplotlib", "fontlist-*.json")); len(fonts) == 0 {
		t.Error("matplotlib's font cache was not warmed in /home/user")
	}

	start := time.Now()
	_, outcome, err = buildCodeInterpreter(ctx, BuildOptions{DataDir: t.TempDir()})
	if err != nil || outcome != outcomeCacheHit {
		t.Errorf("build into a second data dir: %s, %v; want a cache hit", outcome, err)
	}
	t.Logf("second build (cache hit) took %s", time.Since(start).Round(time.Millisecond))
}
