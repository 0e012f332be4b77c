//go:build linux && amd64

package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
)

// fakeSnapshot writes a well-formed snapshot directory for want (a state
// file the VMM's reader accepts, a memory file of its size, a disk) with
// no VM behind it: what loadSnapshot checks needs no KVM.
func fakeSnapshot(t *testing.T, dir string, want snapMetaData) {
	t.Helper()
	const memSize = 1 << 20
	st := &snapshot.State{MemSize: memSize, Regions: []snapshot.Region{{Size: memSize}}}
	for i := range st.VM.IRQChips {
		st.VM.IRQChips[i].ChipID = uint32(i)
	}
	for i := range want.VCPUs {
		st.VCPUs = append(st.VCPUs, snapshot.VCPUState{ID: uint32(i), XSave: make([]byte, kvm.XSaveLegacySize)})
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := snapshot.WriteFile(filepath.Join(dir, snapState), st); err != nil {
		t.Fatal(err)
	}
	mem := make([]byte, memSize)
	copy(mem, "guest memory")
	if err := os.WriteFile(filepath.Join(dir, snapMemory), mem, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, snapDisk), 0); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(dir, snapDisk))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(int64(want.DiskMB) << 20)
	f.Close()
	sum, err := hashFile(filepath.Join(dir, snapMemory))
	if err != nil {
		t.Fatal(err)
	}
	want.MemorySHA256 = sum
	b, _ := json.Marshal(want)
	if err := os.WriteFile(filepath.Join(dir, snapMeta), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestLoadSnapshotBad: a snapshot that is truncated, corrupt, or made from
// other inputs (another guest kernel, image or VMM) is refused with an
// error that says which, wrapping ErrSnapshot; a whole one loads.
func TestLoadSnapshotBad(t *testing.T) {
	want := snapMetaData{Layout: snapshotLayout, Key: "k", KernelKey: "kernel-a", ImageKey: "image-a", VMMHash: "vmm-a", VCPUs: 2, MemoryMiB: 1, DiskMB: 4}
	for _, tc := range []struct {
		name  string
		spoil func(t *testing.T, dir string)
		msg   string
	}{
		{"whole", func(*testing.T, string) {}, ""},
		{"another kernel", func(t *testing.T, dir string) { editMeta(t, dir, func(m *snapMetaData) { m.KernelKey = "kernel-b" }) },
			"made for guest kernel kernel-b, this runtime boots kernel-a"},
		{"another image", func(t *testing.T, dir string) { editMeta(t, dir, func(m *snapMetaData) { m.ImageKey = "image-b" }) },
			"template image image-b"},
		{"another VMM", func(t *testing.T, dir string) { editMeta(t, dir, func(m *snapMetaData) { m.VMMHash = "vmm-b" }) },
			"another VMM binary"},
		{"other sizes", func(t *testing.T, dir string) { editMeta(t, dir, func(m *snapMetaData) { m.MemoryMiB = 2 }) },
			"2 MiB"},
		{"truncated memory", func(t *testing.T, dir string) { os.Truncate(filepath.Join(dir, snapMemory), 4096) },
			"memory file is 4096 bytes, the state says 1048576 (truncated?)"},
		{"corrupt memory", func(t *testing.T, dir string) {
			f, _ := os.OpenFile(filepath.Join(dir, snapMemory), os.O_WRONLY, 0)
			f.WriteAt([]byte("X"), 100)
			f.Close()
		}, "(corrupt)"},
		{"corrupt state", func(t *testing.T, dir string) {
			p := filepath.Join(dir, snapState)
			b, _ := os.ReadFile(p)
			b[len(b)/2] ^= 0xff
			os.WriteFile(p, b, 0o600)
		}, "snapshot:"},
		{"truncated state", func(t *testing.T, dir string) { os.Truncate(filepath.Join(dir, snapState), 10) }, "snapshot:"},
		{"no memory", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, snapMemory)) }, "no such file"},
		{"truncated disk", func(t *testing.T, dir string) { os.Truncate(filepath.Join(dir, snapDisk), 1<<20) }, "disk is 1048576 bytes"},
		{"garbage meta", func(t *testing.T, dir string) { os.WriteFile(filepath.Join(dir, snapMeta), []byte("{"), 0o600) }, "meta.json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "snap")
			fakeSnapshot(t, dir, want)
			tc.spoil(t, dir)
			s, err := loadSnapshot(dir, "/img", want)
			if tc.msg == "" {
				if err != nil || s.Meta.Key != "k" || s.Image != "/img" {
					t.Fatalf("whole snapshot: %+v, %v", s, err)
				}
				return
			}
			if !errors.Is(err, ErrSnapshot) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want ErrSnapshot saying %q", err, tc.msg)
			}
		})
	}
}

func editMeta(t *testing.T, dir string, edit func(*snapMetaData)) {
	t.Helper()
	p := filepath.Join(dir, snapMeta)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var m snapMetaData
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	edit(&m)
	b, _ = json.Marshal(m)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestUnusableSnapshotMovedAside: a create that finds the cache's
// snapshot unusable fails saying why and moves it aside, so that the next
// create builds a new one instead of failing the same way for ever.
func TestUnusableSnapshotMovedAside(t *testing.T) {
	cache := t.TempDir()
	vmmBin := filepath.Join(t.TempDir(), "cubicle")
	os.WriteFile(vmmBin, []byte("a VMM binary"), 0o700)
	r := &Runtime{
		opts: Options{CacheDir: cache, KernelKey: "kernel-a", VMM: vmmBin,
			Image: func(context.Context, runtime.Config) (Image, error) { return Image{Path: "/img", Key: "image-a"}, nil }},
		log:   slog.New(slog.DiscardHandler),
		snaps: map[string]*snapshotEntry{},
	}
	cfg := runtime.Config{ID: "a", CPUCount: 1, MemoryMB: 1, DiskSizeMB: 4}
	want, err := r.wantMeta(cfg, Image{Path: "/img", Key: "image-a"})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(r.snapshotRoot(), want.Key)
	fakeSnapshot(t, dir, want)
	if s, err := r.snapshot(context.Background(), cfg); err != nil || s.Dir != dir {
		t.Fatalf("a whole snapshot: %v, %v", s, err)
	}
	// A fresh runtime (the loaded one is cached) meets a corrupt copy.
	r.snaps = map[string]*snapshotEntry{}
	os.Truncate(filepath.Join(dir, snapMemory), 8192)
	if _, err := r.snapshot(context.Background(), cfg); !errors.Is(err, ErrSnapshot) {
		t.Fatalf("truncated: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the unusable snapshot is still in place: %v", err)
	}
	aside, _ := filepath.Glob(dir + ".bad-*")
	if len(aside) != 1 {
		t.Fatalf("moved aside: %v", aside)
	}
}
