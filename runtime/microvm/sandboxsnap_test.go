//go:build linux && amd64

package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
)

// fakeSandboxSnap writes a well-formed sandbox snapshot directory (state
// and memory of a 1 MiB, 2-vCPU VM as fakeSnapshot makes them, a 4 MiB
// disk) with no VM behind it: what loadSandboxSnap and Restore check
// before they make anything needs no KVM.
func fakeSandboxSnap(t *testing.T, dir string, memory bool) sandboxSnapMeta {
	t.Helper()
	fakeSnapshot(t, dir, snapMetaData{VCPUs: 2, MemoryMiB: 1, DiskMB: 4})
	os.Remove(filepath.Join(dir, snapMeta))
	if !memory {
		os.Remove(filepath.Join(dir, snapState))
		os.Remove(filepath.Join(dir, snapMemory))
	}
	m := sandboxSnapMeta{Version: sbSnapVersion, Runtime: Name, Memory: memory,
		Config: runtime.Config{ID: "src", RootFS: "/tmpl", CPUCount: 2, MemoryMB: 1, DiskSizeMB: 4},
		Origin: origin{TemplateSnapshot: "k", ImageKey: "image-a", KernelKey: "kernel-a", VMMHash: "", VCPUs: 2, MemoryMiB: 1},
		VCPUs:  2, MemoryMiB: 1, DiskMB: 4}
	writeSnapMeta(t, dir, m)
	return m
}

func writeSnapMeta(t *testing.T, dir string, m sandboxSnapMeta) {
	t.Helper()
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, sbSnapMeta), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestLoadSandboxSnapBad: a sandbox snapshot that is not one, is
// another backend's or version, or whose files are missing, truncated or
// disagree with its meta is refused with ErrInvalidConfig saying which;
// a whole one loads, with and without memory.
func TestLoadSandboxSnapBad(t *testing.T) {
	edit := func(f func(*sandboxSnapMeta)) func(*testing.T, string, sandboxSnapMeta) {
		return func(t *testing.T, dir string, m sandboxSnapMeta) { f(&m); writeSnapMeta(t, dir, m) }
	}
	for _, tc := range []struct {
		name   string
		memory bool
		spoil  func(t *testing.T, dir string, m sandboxSnapMeta)
		msg    string
	}{
		{"whole", true, func(*testing.T, string, sandboxSnapMeta) {}, ""},
		{"whole without memory", false, func(*testing.T, string, sandboxSnapMeta) {}, ""},
		{"no meta", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, sbSnapMeta)) }, "is not a snapshot"},
		{"garbage meta", true, func(t *testing.T, dir string, _ sandboxSnapMeta) {
			os.WriteFile(filepath.Join(dir, sbSnapMeta), []byte("{"), 0o600)
		}, "unexpected end of JSON"},
		{"gVisor's", true, edit(func(m *sandboxSnapMeta) { m.Runtime = "gvisor" }), `of the "gvisor" backend`},
		{"another version", true, edit(func(m *sandboxSnapMeta) { m.Version = 99 }), "version 99"},
		{"bad sandbox id", true, edit(func(m *sandboxSnapMeta) { m.Config.ID = "../x" }), "sandbox id"},
		{"disk size disagrees", true, edit(func(m *sandboxSnapMeta) { m.Config.DiskSizeMB = 8 }), "does not match"},
		{"no VM", true, edit(func(m *sandboxSnapMeta) { m.VCPUs = 0 }), "not a VM"},
		{"no image key", true, edit(func(m *sandboxSnapMeta) { m.Origin.ImageKey = "" }), "must name its template image"},
		{"vCPUs disagree", true, edit(func(m *sandboxSnapMeta) { m.VCPUs, m.Config.CPUCount = 3, 3 }), "does not match its meta"},
		{"memory size disagrees", true, edit(func(m *sandboxSnapMeta) { m.MemoryMiB = 2 }), "does not match its meta"},
		{"truncated disk", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Truncate(filepath.Join(dir, snapDisk), 1<<20) }, "not 4 MiB"},
		{"no disk", false, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, snapDisk)) }, "not 4 MiB"},
		{"truncated memory", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Truncate(filepath.Join(dir, snapMemory), 4096) }, "truncated?"},
		{"no memory file", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, snapMemory)) }, "memory file is missing"},
		{"no state", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, snapState)) }, "no such file"},
		{"corrupt state", true, func(t *testing.T, dir string, _ sandboxSnapMeta) {
			p := filepath.Join(dir, snapState)
			b, _ := os.ReadFile(p)
			b[len(b)/2] ^= 0xff
			os.WriteFile(p, b, 0o600)
		}, "snapshot:"},
		{"memory claimed, none there", false, edit(func(m *sandboxSnapMeta) { m.Memory, m.Origin.VMMHash = true, "v" }), "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "snap")
			m := fakeSandboxSnap(t, dir, tc.memory)
			if tc.memory {
				m.Origin.VMMHash = "vmm-a"
				writeSnapMeta(t, dir, m)
			}
			tc.spoil(t, dir, m)
			s, err := loadSandboxSnap(dir)
			if tc.msg == "" {
				if err != nil || s.meta.Config.ID != "src" || s.meta.Memory != tc.memory {
					t.Fatalf("whole snapshot: %+v, %v", s, err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want ErrInvalidConfig saying %q", err, tc.msg)
			}
		})
	}
}

// TestRestoreRefuses: Restore refuses a snapshot it cannot honour (made
// on another template, another disk size, too little memory or too few
// vCPUs for its VM, a template image or VMM other than the ones its
// guest had) before it makes anything: no sandbox directory is left.
func TestRestoreRefuses(t *testing.T) {
	vmmBin := filepath.Join(t.TempDir(), "cubicle")
	os.WriteFile(vmmBin, []byte("a VMM binary"), 0o700)
	sum, err := hashFile(vmmBin)
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	r := &Runtime{
		opts: Options{StateDir: state, CacheDir: t.TempDir(), KernelKey: "kernel-a", VMM: vmmBin,
			Image: func(_ context.Context, cfg runtime.Config) (Image, error) {
				if cfg.RootFS == "/other-image" {
					return Image{Path: "/img", Key: "image-b"}, nil
				}
				return Image{Path: "/img", Key: "image-a"}, nil
			}},
		log:   slog.New(slog.DiscardHandler),
		snaps: map[string]*snapshotEntry{},
	}
	mem, fsOnly := filepath.Join(t.TempDir(), "mem"), filepath.Join(t.TempDir(), "fs")
	m := fakeSandboxSnap(t, mem, true)
	m.Origin.VMMHash = sum
	writeSnapMeta(t, mem, m)
	fakeSandboxSnap(t, fsOnly, false)
	att := network.Attachment{ID: "dst", Netns: "/run/netns/none", Tap: "tap0", Addr: netip.MustParseAddr("100.88.0.2")}
	cfg := runtime.Config{ID: "dst", RootFS: "/tmpl", CPUCount: 2, MemoryMB: 1, DiskSizeMB: 4, Network: att}
	for _, tc := range []struct {
		name string
		dir  string
		edit func(*runtime.Config)
		msg  string
	}{
		{"another template", mem, func(c *runtime.Config) { c.RootFS = "/other" }, "made on template /tmpl, not /other"},
		{"another disk size", mem, func(c *runtime.Config) { c.DiskSizeMB = 8 }, "disk is 4 MiB, not 8"},
		{"another disk size, filesystem only", fsOnly, func(c *runtime.Config) { c.DiskSizeMB = 8 }, "disk is 4 MiB, not 8"},
		{"no memory", mem, func(c *runtime.Config) { c.MemoryMB = 0 }, "must be positive"},
		{"too few vCPUs", mem, func(c *runtime.Config) { c.CPUCount = 1 }, "2 vCPUs; 1 is too few"},
		{"volumes", mem, func(c *runtime.Config) { c.Volumes = []runtime.VolumeMount{{Path: "/v", HostDir: "/tmp"}} }, "volumes are not supported"},
		{"no network", mem, func(c *runtime.Config) { c.Network = network.Attachment{} }, "tap-mode attachment"},
		{"not a snapshot", filepath.Dir(mem), func(*runtime.Config) {}, "is not a snapshot"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			tc.edit(&c)
			_, err := r.Restore(context.Background(), c, tc.dir)
			if err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want an error saying %q", err, tc.msg)
			}
			if !errors.Is(err, ErrInvalidConfig) && !errors.Is(err, runtime.ErrUnsupported) {
				t.Errorf("%v wraps neither ErrInvalidConfig nor ErrUnsupported", err)
			}
			if left, _ := os.ReadDir(state); len(left) != 0 {
				t.Errorf("left in the state dir: %v", left)
			}
		})
	}
	t.Run("another image or VMM", func(t *testing.T) {
		c := cfg
		c.RootFS = "/other-image"
		m2 := m
		m2.Config.RootFS = "/other-image"
		writeSnapMeta(t, mem, m2)
		defer writeSnapMeta(t, mem, m)
		if _, err := r.Restore(context.Background(), c, mem); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "template image image-a mounted") {
			t.Errorf("another image: %v", err)
		}
		m3 := m
		m3.Origin.VMMHash = "another"
		writeSnapMeta(t, mem, m3)
		if _, err := r.Restore(context.Background(), cfg, mem); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "another VMM binary") {
			t.Errorf("another VMM: %v", err)
		}
		if left, _ := os.ReadDir(state); len(left) != 0 {
			t.Errorf("left in the state dir: %v", left)
		}
	})
}

// FuzzSandboxSnapMeta: snapshot.json is a file on disk; whatever it
// holds, the parser answers without panicking, and what it accepts is a
// backend-, version- and size-consistent meta with a valid sandbox ID.
func FuzzSandboxSnapMeta(f *testing.F) {
	good, _ := json.Marshal(sandboxSnapMeta{Version: sbSnapVersion, Runtime: Name, Memory: true,
		Config: runtime.Config{ID: "abc", DiskSizeMB: 4}, Origin: origin{ImageKey: "i", VMMHash: "v"}, VCPUs: 1, MemoryMiB: 1, DiskMB: 4})
	f.Add(good)
	f.Add([]byte(`{"version":1,"runtime":"microvm","config":{"ID":"a","DiskSizeMB":1},"vcpus":1,"memoryMiB":1,"diskMB":1}`))
	f.Add([]byte(`{"version":1,"runtime":"gvisor"}`))
	f.Add([]byte(`{`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseSandboxSnapMeta(b)
		if err != nil {
			return
		}
		if m.Runtime != Name || m.Version != sbSnapVersion || m.DiskMB < 1 || m.DiskMB != m.Config.DiskSizeMB ||
			m.VCPUs < 1 || m.MemoryMiB < 1 || checkID(m.Config.ID) != nil || (m.Memory && (m.Origin.ImageKey == "" || m.Origin.VMMHash == "")) {
			t.Fatalf("accepted %+v", m)
		}
	})
}
