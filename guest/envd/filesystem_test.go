package envd

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	fspb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
)

func TestStat(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(10 * time.Second)
	file := filepath.Join(e.dir, "f.txt")
	if err := os.WriteFile(file, []byte("hello"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(file, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	mtime := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	if err := os.Chtimes(file, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(file, "user.e2b.tag", []byte("v"), 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(file, "user.other", []byte("ignored"), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(e.dir, filepath.Join(e.dir, "dirlink")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("nowhere", filepath.Join(e.dir, "dangling")); err != nil {
		t.Fatal(err)
	}

	got, err := e.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: "f.txt"}))
	if err != nil {
		t.Fatal(err)
	}
	en := got.Msg.GetEntry()
	if en.GetName() != "f.txt" || en.GetPath() != file || en.GetType() != fspb.FileType_FILE_TYPE_FILE || en.GetSize() != 5 ||
		en.GetMode() != 0o640 || en.GetPermissions() != "-rw-r-----" || en.GetOwner() != "nobody" || en.GetGroup() != "nogroup" ||
		!en.GetModifiedTime().AsTime().Equal(mtime) || en.SymlinkTarget != nil || len(en.GetMetadata()) != 1 || en.GetMetadata()["tag"] != "v" {
		t.Errorf("Stat(f.txt) = %v", en)
	}

	rootHome, err := os.Lstat("/root") // "~" for the default user, root here
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		path     string
		typ      fspb.FileType
		target   string
		perm     string
		wantCode connect.Code
	}{
		{path: e.dir, typ: fspb.FileType_FILE_TYPE_DIRECTORY, perm: "drwxr-xr-x"},
		{path: "dirlink", typ: fspb.FileType_FILE_TYPE_DIRECTORY, target: e.dir, perm: "Lrwxrwxrwx"},
		{path: "dangling", typ: fspb.FileType_FILE_TYPE_SYMLINK, target: "nowhere", perm: "Lrwxrwxrwx"},
		{path: "~", typ: fspb.FileType_FILE_TYPE_DIRECTORY, perm: rootHome.Mode().String()},
		{path: "missing", wantCode: connect.CodeNotFound},
		{path: "f.txt/below", wantCode: connect.CodeInvalidArgument},
	}
	for _, c := range cases {
		got, err := e.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: c.path}))
		if code(err) != c.wantCode {
			t.Errorf("Stat(%s): %v, want code %v", c.path, err, c.wantCode)
			continue
		}
		if err != nil {
			continue
		}
		en := got.Msg.GetEntry()
		if en.GetType() != c.typ || en.GetSymlinkTarget() != c.target || en.GetPermissions() != c.perm {
			t.Errorf("Stat(%s) = %v", c.path, en)
		}
	}
}

func TestMakeDirMoveRemove(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(10 * time.Second)

	res, err := e.fs.MakeDir(ctx, as("nobody", &fspb.MakeDirRequest{Path: filepath.Join(e.dir, "x/y/z")}))
	if err != nil {
		t.Fatal(err)
	}
	if en := res.Msg.GetEntry(); en.GetType() != fspb.FileType_FILE_TYPE_DIRECTORY || en.GetOwner() != "nobody" || en.GetPath() != filepath.Join(e.dir, "x/y/z") {
		t.Errorf("MakeDir entry %v", en)
	}
	for _, p := range []string{"x", "x/y"} {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(e.dir, p), &st); err != nil || st.Uid != 65534 {
			t.Errorf("%s: uid %d %v, want the new parents owned by nobody", p, st.Uid, err)
		}
	}
	if _, err := e.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: "x/y/z"})); code(err) != connect.CodeAlreadyExists {
		t.Errorf("MakeDir existing: %v, want already_exists", err)
	}
	if err := os.WriteFile(filepath.Join(e.dir, "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := e.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: "file"})); code(err) != connect.CodeInvalidArgument {
		t.Errorf("MakeDir over a file: %v", err)
	}
	if _, err := e.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: "file/sub"})); code(err) != connect.CodeInvalidArgument {
		t.Errorf("MakeDir below a file: %v", err)
	}

	mv, err := e.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: "x/y", Destination: "moved/here"}))
	if err != nil {
		t.Fatal(err)
	}
	if en := mv.Msg.GetEntry(); en.GetPath() != filepath.Join(e.dir, "moved/here") || en.GetType() != fspb.FileType_FILE_TYPE_DIRECTORY {
		t.Errorf("Move entry %v", en)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "moved/here/z")); err != nil {
		t.Error(err)
	}
	if _, err := e.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: "nope", Destination: "n2"})); code(err) != connect.CodeNotFound {
		t.Errorf("Move missing: %v", err)
	}

	if _, err := e.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: "moved"})); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "moved")); !os.IsNotExist(err) {
		t.Errorf("moved still exists: %v", err)
	}
	if _, err := e.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: "never-existed"})); err != nil {
		t.Errorf("Remove of a missing path: %v (E2B's envd succeeds)", err)
	}
}

func TestListDir(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(10 * time.Second)
	for _, d := range []string{"a/b/c", "a/d"} {
		if err := os.MkdirAll(filepath.Join(e.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"a/f1", "a/b/f2", "a/b/c/f3"} {
		if err := os.WriteFile(filepath.Join(e.dir, f), []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Join(e.dir, "a"), filepath.Join(e.dir, "alink")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(e.dir, "a/fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	a := filepath.Join(e.dir, "a")
	cases := []struct {
		path  string
		depth uint32
		want  []string
	}{
		{"a", 0, []string{"a/b", "a/d", "a/f1", "a/fifo"}},
		{"a", 1, []string{"a/b", "a/d", "a/f1", "a/fifo"}},
		{"a", 2, []string{"a/b", "a/b/c", "a/b/f2", "a/d", "a/f1", "a/fifo"}},
		{"a", 10, []string{"a/b", "a/b/c", "a/b/c/f3", "a/b/f2", "a/d", "a/f1", "a/fifo"}},
		// Through a symlink: entries keep the path the client used.
		{"alink", 1, []string{"alink/b", "alink/d", "alink/f1", "alink/fifo"}},
	}
	for _, c := range cases {
		res, err := e.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: c.path, Depth: c.depth}))
		if err != nil {
			t.Fatalf("ListDir(%s, %d): %v", c.path, c.depth, err)
		}
		var want []string
		for _, w := range c.want {
			want = append(want, filepath.Join(e.dir, w))
		}
		if got := entryPaths(res.Msg.GetEntries()); got != strings.Join(want, ",") {
			t.Errorf("ListDir(%s, %d) = %s, want %s", c.path, c.depth, got, strings.Join(want, ","))
		}
	}
	res, _ := e.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: a}))
	types := map[string]fspb.FileType{}
	for _, en := range res.Msg.GetEntries() {
		types[en.GetName()] = en.GetType()
	}
	if types["b"] != fspb.FileType_FILE_TYPE_DIRECTORY || types["f1"] != fspb.FileType_FILE_TYPE_FILE || types["fifo"] != fspb.FileType_FILE_TYPE_UNSPECIFIED {
		t.Errorf("types %v", types)
	}
	for path, want := range map[string]connect.Code{"missing": connect.CodeNotFound, "a/f1": connect.CodeInvalidArgument} {
		if _, err := e.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: path})); code(err) != want {
			t.Errorf("ListDir(%s): %v, want %v", path, err, want)
		}
	}
}

// watchEvents reads WatchDir events until n have arrived (keepalives ignored).
func recvEvents(t *testing.T, s *connect.ServerStreamForClient[fspb.WatchDirResponse], until func([]*fspb.FilesystemEvent) bool) []*fspb.FilesystemEvent {
	t.Helper()
	var evs []*fspb.FilesystemEvent
	for !until(evs) {
		if !s.Receive() {
			t.Fatalf("stream ended after %v: %v", evs, s.Err())
		}
		if fe := s.Msg().GetFilesystem(); fe != nil {
			evs = append(evs, fe)
		}
	}
	return evs
}

func has(evs []*fspb.FilesystemEvent, typ fspb.EventType, name string) bool {
	return slices.ContainsFunc(evs, func(e *fspb.FilesystemEvent) bool { return e.GetType() == typ && e.GetName() == name })
}

func TestWatchDir(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(20 * time.Second)
	root := filepath.Join(e.dir, "w")
	if err := os.MkdirAll(filepath.Join(root, "old/deep"), 0o755); err != nil {
		t.Fatal(err)
	}

	req := connect.NewRequest(&fspb.WatchDirRequest{Path: "w", Recursive: true, IncludeEntry: true})
	req.Header().Set("Keepalive-Ping-Interval", "1")
	s, err := e.fs.WatchDir(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.Receive() || s.Msg().GetStart() == nil {
		t.Fatalf("first event %v, want start (%v)", s.Msg(), s.Err())
	}

	// Existing subdirectories are watched; so are new ones, as soon as their
	// creation is reported.
	must(t, os.WriteFile(filepath.Join(root, "old/deep/f"), []byte("1"), 0o644))
	evs := recvEvents(t, s, func(evs []*fspb.FilesystemEvent) bool { return has(evs, fspb.EventType_EVENT_TYPE_WRITE, "old/deep/f") })
	if !has(evs, fspb.EventType_EVENT_TYPE_CREATE, "old/deep/f") {
		t.Errorf("no create event for old/deep/f in %v", evs)
	}
	must(t, os.Mkdir(filepath.Join(root, "new"), 0o755))
	recvEvents(t, s, func(evs []*fspb.FilesystemEvent) bool { return has(evs, fspb.EventType_EVENT_TYPE_CREATE, "new") })
	must(t, os.WriteFile(filepath.Join(root, "new/g"), []byte("2"), 0o644))
	evs = recvEvents(t, s, func(evs []*fspb.FilesystemEvent) bool { return has(evs, fspb.EventType_EVENT_TYPE_WRITE, "new/g") })
	for _, ev := range evs {
		if ev.GetName() == "new/g" && ev.GetType() == fspb.EventType_EVENT_TYPE_WRITE && (ev.GetEntry().GetPath() != filepath.Join(root, "new/g") || ev.GetEntry().GetSize() != 1) {
			t.Errorf("event entry %v", ev.GetEntry())
		}
	}
	must(t, os.Chmod(filepath.Join(root, "new/g"), 0o600))
	must(t, os.Rename(filepath.Join(root, "new/g"), filepath.Join(root, "h")))
	must(t, os.Remove(filepath.Join(root, "h")))
	evs = recvEvents(t, s, func(evs []*fspb.FilesystemEvent) bool { return has(evs, fspb.EventType_EVENT_TYPE_REMOVE, "h") })
	for _, want := range []struct {
		typ  fspb.EventType
		name string
	}{{fspb.EventType_EVENT_TYPE_CHMOD, "new/g"}, {fspb.EventType_EVENT_TYPE_RENAME, "new/g"}, {fspb.EventType_EVENT_TYPE_CREATE, "h"}} {
		if !has(evs, want.typ, want.name) {
			t.Errorf("no %v %s in %v", want.typ, want.name, evs)
		}
	}
	// A directory moved out of the tree is no longer reported.
	must(t, os.Rename(filepath.Join(root, "new"), filepath.Join(e.dir, "outside")))
	recvEvents(t, s, func(evs []*fspb.FilesystemEvent) bool { return has(evs, fspb.EventType_EVENT_TYPE_RENAME, "new") })
	must(t, os.WriteFile(filepath.Join(e.dir, "outside/x"), []byte("x"), 0o644))
	must(t, os.WriteFile(filepath.Join(root, "marker"), []byte("m"), 0o644))
	evs = recvEvents(t, s, func(evs []*fspb.FilesystemEvent) bool { return has(evs, fspb.EventType_EVENT_TYPE_CREATE, "marker") })
	for _, ev := range evs {
		if strings.Contains(ev.GetName(), "x") {
			t.Errorf("event from outside the tree: %v", ev)
		}
	}

	// Idle: keepalives come at the requested period.
	for !s.Receive() || s.Msg().GetKeepalive() == nil {
		if s.Err() != nil {
			t.Fatal(s.Err())
		}
	}
}

func TestWatchDirNonRecursiveAndErrors(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(20 * time.Second)
	must(t, os.MkdirAll(filepath.Join(e.dir, "sub"), 0o755))
	must(t, os.WriteFile(filepath.Join(e.dir, "file"), nil, 0o644))

	s, err := e.fs.WatchDir(ctx, connect.NewRequest(&fspb.WatchDirRequest{Path: e.dir}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.Receive() || s.Msg().GetStart() == nil {
		t.Fatalf("no start event: %v", s.Err())
	}
	must(t, os.WriteFile(filepath.Join(e.dir, "sub/ignored"), nil, 0o644))
	must(t, os.WriteFile(filepath.Join(e.dir, "seen"), nil, 0o644))
	evs := recvEvents(t, s, func(evs []*fspb.FilesystemEvent) bool { return has(evs, fspb.EventType_EVENT_TYPE_CREATE, "seen") })
	if has(evs, fspb.EventType_EVENT_TYPE_CREATE, "sub/ignored") || evs[0].Entry != nil {
		t.Errorf("non-recursive watch without entries reported %v", evs)
	}

	for path, want := range map[string]connect.Code{"missing": connect.CodeNotFound, "file": connect.CodeInvalidArgument} {
		s, err := e.fs.WatchDir(ctx, connect.NewRequest(&fspb.WatchDirRequest{Path: path}))
		if err == nil {
			for s.Receive() {
			}
			err = s.Err()
		}
		if code(err) != want {
			t.Errorf("WatchDir(%s): %v, want %v", path, err, want)
		}
	}
}

func TestPolledWatcher(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(20 * time.Second)
	res, err := e.fs.CreateWatcher(ctx, connect.NewRequest(&fspb.CreateWatcherRequest{Path: e.dir, Recursive: true}))
	if err != nil {
		t.Fatal(err)
	}
	id := res.Msg.GetWatcherId()
	must(t, os.Mkdir(filepath.Join(e.dir, "d"), 0o755))
	var evs []*fspb.FilesystemEvent
	waitFor(t, 5*time.Second, "polled events", func() bool {
		got, err := e.fs.GetWatcherEvents(ctx, connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id}))
		if err != nil {
			t.Fatal(err)
		}
		evs = append(evs, got.Msg.GetEvents()...)
		if has(evs, fspb.EventType_EVENT_TYPE_CREATE, "d") && !has(evs, fspb.EventType_EVENT_TYPE_CREATE, "d/f") {
			// The new directory is watched by the time its creation is reported.
			must(t, os.WriteFile(filepath.Join(e.dir, "d/f"), nil, 0o644))
		}
		return has(evs, fspb.EventType_EVENT_TYPE_CREATE, "d/f")
	})
	// Fetched events are gone.
	got, err := e.fs.GetWatcherEvents(ctx, connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id}))
	if err != nil || len(got.Msg.GetEvents()) != 0 {
		t.Errorf("second fetch: %v %v", got.Msg.GetEvents(), err)
	}
	if _, err := e.fs.RemoveWatcher(ctx, connect.NewRequest(&fspb.RemoveWatcherRequest{WatcherId: id})); err != nil {
		t.Fatal(err)
	}
	if _, err := e.fs.GetWatcherEvents(ctx, connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id})); code(err) != connect.CodeNotFound {
		t.Errorf("after removal: %v", err)
	}
	if _, err := e.fs.RemoveWatcher(ctx, connect.NewRequest(&fspb.RemoveWatcherRequest{WatcherId: id})); code(err) != connect.CodeNotFound {
		t.Errorf("second removal: %v", err)
	}
	if _, err := e.fs.CreateWatcher(ctx, connect.NewRequest(&fspb.CreateWatcherRequest{Path: "missing"})); code(err) != connect.CodeNotFound {
		t.Errorf("watcher on a missing dir: %v", err)
	}
}

func TestFilesystemUserErrors(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(10 * time.Second)
	if _, err := e.fs.Stat(ctx, as("no-such-user", &fspb.StatRequest{Path: "/"})); code(err) != connect.CodeUnauthenticated {
		t.Errorf("unknown user: %v", err)
	}
	req := connect.NewRequest(&fspb.StatRequest{Path: "/"})
	req.Header().Set("Authorization", "Bearer nonsense")
	if _, err := e.fs.Stat(ctx, req); code(err) != connect.CodeUnauthenticated {
		t.Errorf("malformed Authorization: %v", err)
	}
	// nobody's home is /nonexistent: "~" resolves there, and it does not exist.
	if _, err := e.fs.Stat(ctx, as("nobody", &fspb.StatRequest{Path: "~/x"})); code(err) != connect.CodeNotFound {
		t.Errorf("nobody's ~: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
