package gvisor

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunOnce: a command runs in a sandbox whose root is the directory
// itself; its writes stay there, its output and status come back, a
// cancelled run is killed, and nothing of any run is left.
func TestRunOnce(t *testing.T) {
	e := newEnv(t, "100.88.253.64/28")
	ctx := context.Background()
	root := makeTemplate(t)
	os.MkdirAll(filepath.Join(root, "home", "user"), 0o755)
	probe, err := os.ReadFile(probePath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "probe"), probe, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(id, user, cwd string, args ...string) (int, string, error) {
		t.Helper()
		att, err := e.pool.Setup(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		defer e.pool.Teardown(ctx, id)
		var out bytes.Buffer
		code, err := e.rt.RunOnce(ctx, OnceConfig{ID: id, RootFS: root, Args: args, Env: []string{"STEP=" + id},
			Cwd: cwd, User: user, CPUCount: 1, MemoryMB: 256, Network: att, Output: &out})
		return code, out.String(), err
	}
	cases := []struct {
		name, user, cwd string
		args            []string
		code            int
		out             []string
		file, content   string
	}{
		{"root", "", "/", []string{"/probe", "-once", "/built.txt", "one"}, 0, []string{"wrote /built.txt as 0", "cwd / env "}, "built.txt", "one"},
		{"by name", "user", "/home/user", []string{"/probe", "-once", "/home/user/mine", "two"}, 0, []string{"as 1000", "cwd /home/user"}, "home/user/mine", "two"},
		{"by number", "1000:0", "/", []string{"/probe", "-once", "/home/user/n", "x"}, 0, []string{"as 1000"}, "home/user/n", "x"},
		{"a failure's status", "", "/", []string{"/probe", "-once", "/failed", "y", "fail"}, 3, []string{"wrote /failed"}, "failed", "y"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			os.Chown(filepath.Join(root, "home", "user"), 1000, 1000)
			code, out, err := run(testID("once"), c.user, c.cwd, c.args...)
			if err != nil || code != c.code {
				t.Fatalf("code %d, err %v; output %q", code, err, out)
			}
			for _, w := range c.out {
				if !strings.Contains(out, w) {
					t.Errorf("output %q lacks %q", out, w)
				}
			}
			if got, err := os.ReadFile(filepath.Join(root, c.file)); err != nil || string(got) != c.content {
				t.Errorf("the root's %s: %q, %v", c.file, got, err)
			}
		})
	}
	if _, _, err := run(testID("once"), "nobody-here", "/", "/probe"); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("an unknown user: %v", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	id := testID("hang")
	att, err := e.pool.Setup(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = e.rt.RunOnce(cctx, OnceConfig{ID: id, RootFS: root, Args: []string{"/probe", "-once", "/h", "h", "hang"},
		CPUCount: 1, MemoryMB: 256, Network: att})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Minute {
		t.Errorf("a cancelled run: %v after %v", err, time.Since(start))
	}
	e.pool.Teardown(ctx, id)
}
