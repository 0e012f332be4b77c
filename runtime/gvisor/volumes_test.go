package gvisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/runtime"
)

// TestVolumeShared: a volume written by one sandbox is read by another
// running at the same time, what either writes the other sees, the files
// outlive both sandboxes, a third one finds them, and the mount points
// never touch the template.
func TestVolumeShared(t *testing.T) {
	e := newEnv(t, "100.88.249.0/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	before := treeDigest(t, tmpl)
	vol := filepath.Join(t.TempDir(), "vol")
	if err := os.Mkdir(vol, 0o777); err != nil {
		t.Fatal(err)
	}
	start := func(name, at string) runtime.Sandbox {
		t.Helper()
		cfg := config(testID(name), tmpl)
		cfg.Volumes = []runtime.VolumeMount{{HostDir: vol, Path: at}}
		sb, err := e.create(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		waitHealthy(t, sb, 10*time.Second)
		return sb
	}
	a := start("va", "/mnt/data")
	b := start("vb", "/home/user/shared")

	if code, body := get(t, a, "/write?path=/mnt/data/deep/x&data=from-a"); code != 200 {
		t.Fatalf("write in a: %d %s", code, body)
	}
	if got, _ := os.ReadFile(filepath.Join(vol, "deep", "x")); string(got) != "from-a" {
		t.Fatalf("the host's volume holds %q", got)
	}
	if code, body := get(t, b, "/read?path=/home/user/shared/deep/x"); code != 200 || body != "from-a" {
		t.Fatalf("read in b: %d %q", code, body)
	}
	if code, body := get(t, b, "/write?path=/home/user/shared/y&data=from-b"); code != 200 {
		t.Fatalf("write in b: %d %s", code, body)
	}
	if code, body := get(t, a, "/read?path=/mnt/data/y"); code != 200 || body != "from-b" {
		t.Fatalf("a reads what b wrote: %d %q", code, body)
	}
	// The host writes (the content API): both see it.
	if err := os.WriteFile(filepath.Join(vol, "z"), []byte("from-host"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, a, "/read?path=/mnt/data/z"); code != 200 || body != "from-host" {
		t.Fatalf("a reads what the host wrote: %d %q", code, body)
	}
	// Outside the mount, the sandboxes stay apart.
	get(t, a, "/write?path=/mnt/private&data=a")
	if code, _ := get(t, b, "/read?path=/mnt/private"); code == 200 {
		t.Fatal("b sees a's own layer")
	}

	for _, sb := range []runtime.Sandbox{a, b} {
		if err := e.kill(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
	}
	for name, want := range map[string]string{"deep/x": "from-a", "y": "from-b", "z": "from-host"} {
		if got, err := os.ReadFile(filepath.Join(vol, name)); err != nil || string(got) != want {
			t.Fatalf("after both were killed, %s holds %q, %v", name, got, err)
		}
	}
	c := start("vc", "/data")
	if code, body := get(t, c, "/read?path=/data/deep/x"); code != 200 || body != "from-a" {
		t.Fatalf("a later sandbox reads: %d %q", code, body)
	}
	if err := e.kill(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if after := treeDigest(t, tmpl); after != before {
		t.Fatalf("the template changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestVolumeConfigErrors: bad volumes are refused before anything is made.
func TestVolumeConfigErrors(t *testing.T) {
	e := newEnv(t, "100.88.249.16/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	for name, v := range map[string]runtime.VolumeMount{
		"missing host dir": {HostDir: "/nonexistent/volume", Path: "/data"},
		"host file":        {HostDir: file, Path: "/data"},
		"reserved path":    {HostDir: t.TempDir(), Path: "/proc/x"},
		"relative path":    {HostDir: t.TempDir(), Path: "data"},
		"envd's dir":       {HostDir: t.TempDir(), Path: "/.cubicle"},
	} {
		cfg := config(testID("ve"), tmpl)
		cfg.Volumes = []runtime.VolumeMount{v}
		if _, err := e.create(ctx, cfg); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: Create = %v, want ErrInvalidConfig", name, err)
		}
		if _, err := os.Stat(filepath.Join(e.stateDir, cfg.ID)); !os.IsNotExist(err) {
			t.Errorf("%s: left %s behind", name, cfg.ID)
		}
	}
}
