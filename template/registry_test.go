package template

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// installForTest puts a template with a one-file rootfs into r the way a
// builder does, and returns it as stored.
func installForTest(t *testing.T, r *Registry, tmpl Template, marker string) Template {
	t.Helper()
	staging, err := r.stage(tmpl.TemplateID)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(staging, rootfsDir)
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "marker"), []byte(marker), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.install(tmpl, staging); err != nil {
		t.Fatalf("install %s: %v", tmpl.TemplateID, err)
	}
	got, err := r.Get(tmpl.TemplateID)
	if err != nil {
		t.Fatalf("Get(%s) after install: %v", tmpl.TemplateID, err)
	}
	return got
}

func newTestRegistry(t *testing.T) (*Registry, string) {
	t.Helper()
	dataDir := t.TempDir()
	r, err := Open(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	return r, dataDir
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestRegistryGet(t *testing.T) {
	r, _ := newTestRegistry(t)
	base := installForTest(t, r, Template{TemplateID: BaseID, Aliases: []string{BaseID}, CreatedAt: t0, Public: true}, "base")
	idA := NewID()
	a := installForTest(t, r, Template{TemplateID: idA, Aliases: []string{"py-data", "analysis"}, CPUCount: 4, MemoryMB: 1024, CreatedAt: t0.Add(time.Hour)}, "a")
	idB := NewID()
	installForTest(t, r, Template{TemplateID: idB, CreatedAt: t0.Add(2 * time.Hour)}, "b")

	tests := []struct {
		name    string
		query   string
		wantID  string
		wantErr error
	}{
		{"base by id and alias", "base", BaseID, nil},
		{"by id", idA, idA, nil},
		{"by first alias", "py-data", idA, nil},
		{"by second alias", "analysis", idA, nil},
		{"template without aliases by id", idB, idB, nil},
		{"unknown valid id", NewID(), "", ErrNotFound},
		{"unknown alias", "nope", "", ErrNotFound},
		{"empty", "", "", ErrNotFound},
		{"path traversal", "../templates/" + idA, "", ErrNotFound},
		{"uppercase id is not an id", strings.ToUpper(idA), "", ErrNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := r.Get(tc.query)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Get(%q) = %+v, %v; want %v", tc.query, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got.TemplateID != tc.wantID {
				t.Fatalf("Get(%q) = %q, %v; want %q", tc.query, got.TemplateID, err, tc.wantID)
			}
		})
	}

	// Defaults fill what the caller left out, and what it set is kept.
	if base.CPUCount != DefaultCPUCount || base.MemoryMB != DefaultMemoryMB || base.DiskSizeMB != DefaultDiskSizeMB ||
		base.EnvdVersion != DefaultEnvdVersion || !base.Public || !base.CreatedAt.Equal(t0) {
		t.Errorf("base = %+v, want defaults", base)
	}
	if a.CPUCount != 4 || a.MemoryMB != 1024 {
		t.Errorf("a = %+v, want cpu 4 and 1024 MB", a)
	}
	if got := r.RootFS(a); got != filepath.Join(r.dir, idA, "rootfs") {
		t.Errorf("RootFS = %q", got)
	}
	if b, err := os.ReadFile(filepath.Join(r.RootFS(a), "etc", "marker")); err != nil || string(b) != "a" {
		t.Errorf("rootfs of %s: %q, %v", idA, b, err)
	}
	if got := r.RootFS(Template{TemplateID: "../../etc"}); got != "" {
		t.Errorf("RootFS of a forged ID = %q, want \"\"", got)
	}
}

func TestRegistryList(t *testing.T) {
	tests := []struct {
		name string
		// setup adds templates and debris to the registry; want is the
		// listed IDs, oldest first.
		setup func(t *testing.T, r *Registry) []string
	}{
		{"empty", func(t *testing.T, r *Registry) []string { return nil }},
		{"sorted by creation time", func(t *testing.T, r *Registry) []string {
			late, early := NewID(), NewID()
			installForTest(t, r, Template{TemplateID: late, CreatedAt: t0.Add(time.Hour)}, "")
			installForTest(t, r, Template{TemplateID: BaseID, Aliases: []string{BaseID}, CreatedAt: t0.Add(30 * time.Minute)}, "")
			installForTest(t, r, Template{TemplateID: early, CreatedAt: t0}, "")
			return []string{early, BaseID, late}
		}},
		{"crash debris is invisible", func(t *testing.T, r *Registry) []string {
			id := NewID()
			installForTest(t, r, Template{TemplateID: id, CreatedAt: t0}, "")
			// A build that died before install: a staging dir with a rootfs.
			staging, err := r.stage(NewID())
			if err != nil {
				t.Fatal(err)
			}
			mustMkdir(t, filepath.Join(staging, rootfsDir))
			// A directory with a rootfs but no metadata yet.
			mustMkdir(t, filepath.Join(r.dir, NewID(), rootfsDir))
			// A metadata write that died before its rename.
			mustWrite(t, filepath.Join(r.dir, id, ".template.json.tmp-123"), `{"templateID": "garbage`)
			// A stray file.
			mustWrite(t, filepath.Join(r.dir, "README"), "hi")
			return []string{id}
		}},
		{"damaged template.json is skipped", func(t *testing.T, r *Registry) []string {
			good, bad := NewID(), NewID()
			installForTest(t, r, Template{TemplateID: good, CreatedAt: t0}, "")
			installForTest(t, r, Template{TemplateID: bad, CreatedAt: t0}, "")
			mustWrite(t, filepath.Join(r.dir, bad, metadataFile), "{not json")
			return []string{good}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := newTestRegistry(t)
			want := tc.setup(t, r)
			list, err := r.List()
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, tmpl := range list {
				got = append(got, tmpl.TemplateID)
			}
			if !slices.Equal(got, want) {
				t.Errorf("List = %v, want %v", got, want)
			}
		})
	}
}

func TestRegistryPut(t *testing.T) {
	r, dataDir := newTestRegistry(t)
	id := NewID()
	tmpl := installForTest(t, r, Template{TemplateID: id, Aliases: []string{"one"}, CreatedAt: t0}, "x")
	installForTest(t, r, Template{TemplateID: BaseID, Aliases: []string{BaseID}, CreatedAt: t0}, "base")

	tmpl.Aliases = []string{"two", "three"}
	tmpl.Public = true
	if err := r.Put(tmpl); err != nil {
		t.Fatal(err)
	}
	// A second Open sees the change: it is on disk, not in memory.
	r2, err := Open(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{id, "two", "three"} {
		if got, err := r2.Get(q); err != nil || !got.Public || !slices.Equal(got.Aliases, []string{"two", "three"}) {
			t.Errorf("after Put, Get(%q) = %+v, %v", q, got, err)
		}
	}
	if _, err := r2.Get("one"); !errors.Is(err, ErrNotFound) {
		t.Errorf("old alias still resolves: %v", err)
	}
	// The write went through a temporary file that is gone now.
	entries, err := os.ReadDir(filepath.Join(r.dir, id))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{rootfsDir, metadataFile}) {
		t.Errorf("template dir holds %v, want only rootfs and template.json", names)
	}
	if b, err := os.ReadFile(filepath.Join(r.RootFS(tmpl), "etc", "marker")); err != nil || string(b) != "x" {
		t.Errorf("Put touched the rootfs: %q, %v", b, err)
	}

	errTests := []struct {
		name string
		t    Template
		want error
	}{
		{"missing template", Template{TemplateID: NewID()}, ErrNotFound},
		{"bad id", Template{TemplateID: "Not-An-Id"}, ErrInvalid},
		{"traversal id", Template{TemplateID: "../../../../tmp"}, ErrInvalid},
		{"bad alias", Template{TemplateID: id, Aliases: []string{"Has Space"}}, ErrInvalid},
		{"duplicate alias", Template{TemplateID: id, Aliases: []string{"a", "a"}}, ErrInvalid},
		{"negative cpu", Template{TemplateID: id, CPUCount: -1}, ErrInvalid},
		{"alias held by another", Template{TemplateID: id, Aliases: []string{BaseID}}, ErrAliasTaken},
	}
	for _, tc := range errTests {
		t.Run(tc.name, func(t *testing.T) {
			if err := r.Put(tc.t); !errors.Is(err, tc.want) {
				t.Errorf("Put(%+v) = %v, want %v", tc.t, err, tc.want)
			}
		})
	}
	// Failed Puts changed nothing.
	if got, err := r.Get(id); err != nil || !slices.Equal(got.Aliases, []string{"two", "three"}) {
		t.Errorf("after failed Puts: %+v, %v", got, err)
	}
}

// TestRegistryInstallReplaces checks that installing over an existing
// template swaps the whole directory and leaves no work directories behind.
func TestRegistryInstallReplaces(t *testing.T) {
	r, _ := newTestRegistry(t)
	installForTest(t, r, Template{TemplateID: BaseID, Aliases: []string{BaseID}, BuildID: "old", CreatedAt: t0}, "old")
	got := installForTest(t, r, Template{TemplateID: BaseID, Aliases: []string{BaseID}, BuildID: "new", CreatedAt: t0}, "new")
	if got.BuildID != "new" {
		t.Errorf("BuildID = %q after replace", got.BuildID)
	}
	if b, err := os.ReadFile(filepath.Join(r.RootFS(got), "etc", "marker")); err != nil || string(b) != "new" {
		t.Errorf("rootfs after replace: %q, %v", b, err)
	}
	assertNoWorkDirs(t, r)

	// A second template may not take an alias the first holds.
	staging, err := r.stage("aaaaaaaaaaaaaaaaaaaa")
	if err != nil {
		t.Fatal(err)
	}
	err = r.install(Template{TemplateID: "aaaaaaaaaaaaaaaaaaaa", Aliases: []string{BaseID}}, staging)
	if !errors.Is(err, ErrAliasTaken) {
		t.Errorf("install with a taken alias = %v, want ErrAliasTaken", err)
	}
	// Only a staging directory of the registry, for that ID, is accepted.
	if err := r.install(Template{TemplateID: BaseID}, t.TempDir()); err == nil {
		t.Error("install accepted a directory outside the registry")
	}
}

// TestRegistrySweep checks that a crashed writer's work directories are
// removed by the next install, and a live writer's are not.
func TestRegistrySweep(t *testing.T) {
	r, _ := newTestRegistry(t)
	dead := filepath.Join(r.dir, stagingPrefix+BaseID+"-999999999-123")
	deadTrash := filepath.Join(r.dir, trashPrefix+BaseID+"-999999999-456")
	live, err := r.stage(BaseID) // ours: our pid is alive
	if err != nil {
		t.Fatal(err)
	}
	mustMkdir(t, filepath.Join(dead, rootfsDir))
	mustMkdir(t, deadTrash)
	installForTest(t, r, Template{TemplateID: NewID()}, "")
	for _, d := range []string{dead, deadTrash} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("stale %s survived: %v", d, err)
		}
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("live staging dir was swept: %v", err)
	}
}

func TestRegistryDelete(t *testing.T) {
	r, _ := newTestRegistry(t)
	id := NewID()
	installForTest(t, r, Template{TemplateID: id, Aliases: []string{"gone"}}, "")
	keep := installForTest(t, r, Template{TemplateID: NewID()}, "")
	if err := r.Delete("gone"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete = %v, want ErrNotFound", err)
	}
	if _, err := os.Stat(filepath.Join(r.dir, id)); !os.IsNotExist(err) {
		t.Errorf("template dir still there: %v", err)
	}
	if err := r.Delete(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Delete = %v, want ErrNotFound", err)
	}
	if list, err := r.List(); err != nil || len(list) != 1 || list[0].TemplateID != keep.TemplateID {
		t.Errorf("List after Delete = %v, %v", list, err)
	}
	assertNoWorkDirs(t, r)
}

func TestIDs(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := NewID()
		if len(id) != 20 || !ValidID(id) || seen[id] {
			t.Fatalf("NewID() = %q: invalid or repeated", id)
		}
		seen[id] = true
	}
	for _, tc := range []struct {
		id   string
		want bool
	}{
		{"base", true},
		{"abcdefghij0123456789", true},
		{"abcdefghij012345678", false},   // 19
		{"abcdefghij0123456789a", false}, // 21
		{"ABCDEFGHIJ0123456789", false},
		{"abcdefghij-123456789", false},
		{"../../../../../../etc", false},
		{"", false},
		{"Base", false},
	} {
		if got := ValidID(tc.id); got != tc.want {
			t.Errorf("ValidID(%q) = %v, want %v", tc.id, got, tc.want)
		}
	}
}

func TestOpenEmptyDataDir(t *testing.T) {
	if _, err := Open(""); err == nil {
		t.Error("Open(\"\") succeeded")
	}
}

func assertNoWorkDirs(t *testing.T, r *Registry) {
	t.Helper()
	entries, err := os.ReadDir(r.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), stagingPrefix) || strings.HasPrefix(e.Name(), trashPrefix) {
			t.Errorf("work dir left behind: %s", e.Name())
		}
	}
}

func mustMkdir(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
}

func mustWrite(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
