package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/volume"
)

// volumeServer is an API over a real store and real volume directories,
// with two keys (two owners).
func volumeServer(t *testing.T) (s *Server, dirs *volume.Dirs, alice, bob string) {
	t.Helper()
	dirs, err := volume.Open(filepath.Join(t.TempDir(), "volumes"))
	if err != nil {
		t.Fatal(err)
	}
	s, alice = newTestServer(t, Options{Volumes: dirs})
	_, bob, err = s.opts.Store.CreateAPIKey(context.Background(), "bob")
	if err != nil {
		t.Fatal(err)
	}
	return s, dirs, alice, bob
}

// do sends one request with an API key (or, for content, a volume token).
func do(h http.Handler, method, path, key, token, body string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	r.RemoteAddr = "192.0.2.1:1234"
	if key != "" {
		r.Header.Set("X-API-KEY", key)
	}
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func createVolume(t *testing.T, h http.Handler, key, name string) volumeAndToken {
	t.Helper()
	w := do(h, "POST", "/volumes", key, "", fmt.Sprintf(`{"name":%q}`, name))
	if w.Code != http.StatusCreated {
		t.Fatalf("create %s: %d %s", name, w.Code, w.Body)
	}
	var v volumeAndToken
	if err := json.Unmarshal(w.Body.Bytes(), &v); err != nil || v.VolumeID == "" || v.Token == "" || v.Name != name {
		t.Fatalf("create answered %s (%v)", w.Body, err)
	}
	return v
}

func TestVolumesOwnerWall(t *testing.T) {
	s, dirs, alice, bob := volumeServer(t)
	a := createVolume(t, s, alice, "data")
	if fi, err := os.Stat(dirs.Path(a.VolumeID)); err != nil || !fi.IsDir() {
		t.Fatalf("no directory for the new volume: %v", err)
	}
	// Names are per owner.
	b := createVolume(t, s, bob, "data")
	if w := do(s, "POST", "/volumes", alice, "", `{"name":"data"}`); !isAPIError(w, http.StatusConflict) {
		t.Fatalf("duplicate name: %d %s", w.Code, w.Body)
	}

	// Lists show the caller's own.
	w := do(s, "GET", "/volumes", alice, "", "")
	var list []volumeJSON
	if json.Unmarshal(w.Body.Bytes(), &list); w.Code != 200 || len(list) != 1 || list[0].VolumeID != a.VolumeID {
		t.Fatalf("alice's list: %d %s", w.Code, w.Body)
	}

	// Another owner's volume answers exactly as an unknown one.
	unknown := do(s, "GET", "/volumes/nonexistent0000000000", alice, "", "")
	for _, method := range []string{"GET", "DELETE"} {
		w := do(s, method, "/volumes/"+b.VolumeID, alice, "", "")
		if w.Code != http.StatusNotFound || w.Body.String() != unknown.Body.String() {
			t.Fatalf("%s of bob's volume by alice: %d %s; unknown: %d %s", method, w.Code, w.Body, unknown.Code, unknown.Body)
		}
	}
	if w := do(s, "GET", "/volumes/"+a.VolumeID, alice, "", ""); w.Code != 200 || !strings.Contains(w.Body.String(), a.Token) {
		t.Fatalf("alice's own volume: %d %s", w.Code, w.Body)
	}
	if w := do(s, "GET", "/volumes", "", "", ""); w.Code != http.StatusUnauthorized {
		t.Fatalf("no key: %d", w.Code)
	}

	// A volume's token opens its content only.
	if w := do(s, "PUT", "/volumecontent/"+a.VolumeID+"/file?path=/x", "", b.Token, "x"); !isAPIError(w, http.StatusUnauthorized) {
		t.Fatalf("bob's token on alice's volume: %d %s", w.Code, w.Body)
	}
	if w := do(s, "GET", "/volumecontent/nonexistent0000000000/dir?path=/", "", a.Token, ""); !isAPIError(w, http.StatusUnauthorized) {
		t.Fatalf("token of another volume, unknown volume: %d %s", w.Code, w.Body)
	}

	// Delete removes the files; the volume is then unknown.
	if w := do(s, "DELETE", "/volumes/"+b.VolumeID, bob, "", ""); w.Code != http.StatusNoContent {
		t.Fatalf("delete: %d %s", w.Code, w.Body)
	}
	if _, err := os.Stat(dirs.Path(b.VolumeID)); !os.IsNotExist(err) {
		t.Fatalf("directory left after delete: %v", err)
	}
	if w := do(s, "DELETE", "/volumes/"+b.VolumeID, bob, "", ""); !isAPIError(w, http.StatusNotFound) {
		t.Fatalf("second delete: %d %s", w.Code, w.Body)
	}
	if w := do(s, "GET", "/volumecontent/"+b.VolumeID+"/dir?path=/", "", b.Token, ""); !isAPIError(w, http.StatusUnauthorized) {
		t.Fatalf("content of a deleted volume: %d %s", w.Code, w.Body)
	}
}

func TestVolumeNames(t *testing.T) {
	s, _, alice, _ := volumeServer(t)
	for _, name := range []string{"", "a b", "../x", "x/y", "é", "a.b", strings.Repeat("a", maxVolumeName+1)} {
		if w := do(s, "POST", "/volumes", alice, "", fmt.Sprintf(`{"name":%q}`, name)); !isAPIError(w, http.StatusBadRequest) || !strings.Contains(w.Body.String(), "volume name") {
			t.Errorf("name %q: %d %s", name, w.Code, w.Body)
		}
	}
	for _, body := range []string{``, `{`, `{"name":1}`} {
		if w := do(s, "POST", "/volumes", alice, "", body); !isAPIError(w, http.StatusBadRequest) {
			t.Errorf("body %q: %d %s", body, w.Code, w.Body)
		}
	}
	createVolume(t, s, alice, "Ok_name-1")
}

// TestVolumeDeleteWhileMounting: a volume a create is about to mount
// cannot be deleted (409, nothing lost) until that create is done.
func TestVolumeDeleteWhileMounting(t *testing.T) {
	s, dirs, alice, bob := volumeServer(t)
	v := createVolume(t, s, alice, "data")
	must(t, os.WriteFile(filepath.Join(dirs.Path(v.VolumeID), "keep"), []byte("k"), 0o644))
	aliceKey, err := s.opts.Store.VerifyAPIKey(context.Background(), alice)
	if err != nil {
		t.Fatal(err)
	}
	req, err := parseNewSandbox([]byte(`{"templateID":"base","volumeMounts":[{"name":"data","path":"/data/"}]}`), 2)
	if err != nil {
		t.Fatal(err)
	}
	req.Owner = ownerOf(aliceKey)
	release, err := s.resolveVolumes(context.Background(), &req)
	if err != nil {
		t.Fatal(err)
	}
	if m := req.Volumes[0]; m.VolumeID != v.VolumeID || m.HostDir != dirs.Path(v.VolumeID) || m.Path != "/data" {
		t.Fatalf("resolved %+v", m)
	}
	if w := do(s, "DELETE", "/volumes/"+v.VolumeID, alice, "", ""); !isAPIError(w, http.StatusConflict) {
		t.Fatalf("delete while mounting: %d %s", w.Code, w.Body)
	}
	if _, err := os.Stat(filepath.Join(dirs.Path(v.VolumeID), "keep")); err != nil {
		t.Fatalf("a refused delete lost files: %v", err)
	}
	release()
	if w := do(s, "DELETE", "/volumes/"+v.VolumeID, alice, "", ""); w.Code != http.StatusNoContent {
		t.Fatalf("delete after: %d %s", w.Code, w.Body)
	}

	// Names resolve among the owner's volumes only.
	createVolume(t, s, bob, "bobs")
	for _, name := range []string{"bobs", "missing"} {
		req, _ := parseNewSandbox([]byte(fmt.Sprintf(`{"templateID":"base","volumeMounts":[{"name":%q,"path":"/d"}]}`, name)), 2)
		req.Owner = ownerOf(aliceKey)
		if _, err := s.resolveVolumes(context.Background(), &req); !errors.Is(err, orchestrator.ErrInvalid) || !strings.Contains(err.Error(), name) {
			t.Errorf("alice mounting %q: %v", name, err)
		}
	}
	if len(s.vols.pinned) != 0 {
		t.Fatalf("pins left: %v", s.vols.pinned)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestParseVolumeMounts(t *testing.T) {
	many := make([]string, maxVolumeMounts+1)
	for i := range many {
		many[i] = fmt.Sprintf(`{"name":"v%d","path":"/m%d"}`, i, i)
	}
	for _, tc := range []struct {
		name, mounts string
		ok           bool
	}{
		{"one", `[{"name":"data","path":"/home/user/data"}]`, true},
		{"cleaned", `[{"name":"data","path":"/mnt//data/"}]`, true},
		{"two", `[{"name":"a","path":"/a"},{"name":"b","path":"/b"}]`, true},
		{"relative", `[{"name":"data","path":"data"}]`, false},
		{"root", `[{"name":"data","path":"/"}]`, false},
		{"proc", `[{"name":"data","path":"/proc/x"}]`, false},
		{"envd", `[{"name":"data","path":"/.cubicle"}]`, false},
		{"dots to root", `[{"name":"data","path":"/a/.."}]`, false},
		{"overlap", `[{"name":"a","path":"/a"},{"name":"b","path":"/a/b"}]`, false},
		{"bad name", `[{"name":"a b","path":"/a"}]`, false},
		{"no name", `[{"path":"/a"}]`, false},
		{"too many", "[" + strings.Join(many, ",") + "]", false},
		{"not a list", `{"name":"a"}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := parseNewSandbox([]byte(`{"templateID":"base","volumeMounts":`+tc.mounts+`}`), 2)
			if tc.ok != (err == nil) {
				t.Fatalf("got %+v, %v", req.Volumes, err)
			}
			if err != nil && !errors.Is(err, orchestrator.ErrInvalid) {
				t.Fatalf("%v is not a 400", err)
			}
			if tc.name == "cleaned" && req.Volumes[0].Path != "/mnt/data" {
				t.Fatalf("path %q", req.Volumes[0].Path)
			}
		})
	}
}

func TestVolumeContent(t *testing.T) {
	s, dirs, alice, _ := volumeServer(t)
	v := createVolume(t, s, alice, "data")
	dir := dirs.Path(v.VolumeID)
	c := func(method, path, body string) *httptest.ResponseRecorder {
		return do(s, method, "/volumecontent/"+v.VolumeID+path, "", v.Token, body)
	}
	entry := func(w *httptest.ResponseRecorder, code int) entryJSON {
		t.Helper()
		var e entryJSON
		if w.Code != code || json.Unmarshal(w.Body.Bytes(), &e) != nil {
			t.Fatalf("got %d %s, want %d", w.Code, w.Body, code)
		}
		return e
	}

	e := entry(c("PUT", "/file?path=/a/b.txt&force=true&mode=416", "hello"), http.StatusCreated)
	if e.Path != "/a/b.txt" || e.Name != "b.txt" || e.Type != "file" || e.Size != 5 || e.Mode != 0o640 {
		t.Fatalf("upload: %+v", e)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "a/b.txt")); string(b) != "hello" {
		t.Fatalf("on disk: %q", b)
	}
	if w := c("PUT", "/file?path=/nope/x", "x"); !isAPIError(w, http.StatusNotFound) {
		t.Fatalf("upload without parents: %d %s", w.Code, w.Body)
	}
	w := c("GET", "/file?path=a/../a/b.txt", "")
	if w.Code != 200 || w.Body.String() != "hello" || w.Header().Get("Content-Type") != "application/octet-stream" {
		t.Fatalf("download: %d %q %v", w.Code, w.Body, w.Header())
	}
	if w := c("GET", "/file?path=/a", ""); !isAPIError(w, http.StatusBadRequest) {
		t.Fatalf("download of a directory: %d %s", w.Code, w.Body)
	}
	if w := c("GET", "/file?path=/missing", ""); !isAPIError(w, http.StatusNotFound) {
		t.Fatalf("download of a missing file: %d %s", w.Code, w.Body)
	}

	e = entry(c("POST", "/dir?path=/x/y&force=true", ""), http.StatusCreated)
	if e.Type != "directory" || e.Path != "/x/y" {
		t.Fatalf("mkdir: %+v", e)
	}
	if w := c("POST", "/dir?path=/x/y", ""); !isAPIError(w, http.StatusConflict) {
		t.Fatalf("mkdir of an existing dir: %d %s", w.Code, w.Body)
	}
	if w := c("POST", "/dir?path=/p/q", ""); !isAPIError(w, http.StatusNotFound) {
		t.Fatalf("mkdir without parents: %d %s", w.Code, w.Body)
	}

	w = c("GET", "/dir?path=/&depth=2", "")
	var list []entryJSON
	if json.Unmarshal(w.Body.Bytes(), &list); w.Code != 200 || len(list) != 4 {
		t.Fatalf("list depth 2: %d %s", w.Code, w.Body)
	}
	if w := c("GET", "/dir?path=/&depth=x", ""); !isAPIError(w, http.StatusBadRequest) {
		t.Fatalf("bad depth: %d", w.Code)
	}

	e = entry(c("GET", "/path?path=/a/b.txt", ""), http.StatusOK)
	if e.Size != 5 || e.Mtime.IsZero() {
		t.Fatalf("stat: %+v", e)
	}
	e = entry(c("PATCH", "/path?path=/a/b.txt", `{"mode":420,"uid":1000,"gid":1000}`), http.StatusOK)
	if e.Mode != 0o644 || e.UID != 1000 || e.GID != 1000 {
		t.Fatalf("patch: %+v", e)
	}
	if w := c("PATCH", "/path?path=/a/b.txt", `{"mode":-1}`); !isAPIError(w, http.StatusBadRequest) {
		t.Fatalf("bad mode: %d %s", w.Code, w.Body)
	}
	if w := c("GET", "/path", ""); !isAPIError(w, http.StatusBadRequest) {
		t.Fatalf("no path: %d %s", w.Code, w.Body)
	}

	// A symlink out of the volume (as a sandbox may make) is never
	// followed on the host.
	outside := filepath.Join(t.TempDir(), "secret")
	must(t, os.WriteFile(outside, []byte("host"), 0o600))
	must(t, os.Symlink(outside, filepath.Join(dir, "link")))
	if w := c("GET", "/file?path=/link", ""); w.Code == 200 {
		t.Fatalf("read through a symlink out of the volume: %q", w.Body)
	}
	if w := c("GET", "/file?path=../../../../"+outside, ""); w.Code == 200 {
		t.Fatalf("read through ..: %q", w.Body)
	}
	e = entry(c("GET", "/path?path=/link", ""), http.StatusOK)
	if e.Type != "symlink" || e.Target != outside {
		t.Fatalf("stat of a symlink: %+v", e)
	}

	if w := c("DELETE", "/path?path=/a", ""); w.Code != http.StatusNoContent {
		t.Fatalf("remove: %d %s", w.Code, w.Body)
	}
	if w := c("DELETE", "/path?path=/a", ""); !isAPIError(w, http.StatusNotFound) {
		t.Fatalf("remove again: %d %s", w.Code, w.Body)
	}
	if w := c("DELETE", "/path?path=/", ""); !isAPIError(w, http.StatusBadRequest) {
		t.Fatalf("remove root: %d %s", w.Code, w.Body)
	}
	if w := do(s, "GET", "/volumecontent/"+v.VolumeID+"/dir?path=/", "", "", ""); !isAPIError(w, http.StatusUnauthorized) {
		t.Fatalf("no token: %d %s", w.Code, w.Body)
	}
	// Files gone from under the server: an error, without host paths.
	must(t, os.RemoveAll(dir))
	if w := c("GET", "/dir?path=/", ""); !isAPIError(w, http.StatusInternalServerError) || strings.Contains(w.Body.String(), dir) {
		t.Fatalf("missing directory: %d %s", w.Code, w.Body)
	}
}

// FuzzVolumeMounts: whatever mounts a create body names, what is accepted
// is a clean, allowed mount path and a valid name; the rest is a 400.
func FuzzVolumeMounts(f *testing.F) {
	for _, s := range [][2]string{{"data", "/data"}, {"a", "/proc/../data"}, {"a", "/.cubicle/x"}, {"a b", "/x"}, {"a", "//"}, {"a", "/x/../.."}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, name, path string) {
		body, _ := json.Marshal(map[string]any{"templateID": "t", "volumeMounts": []map[string]string{{"name": name, "path": path}}})
		req, err := parseNewSandbox(body, 2)
		if err != nil {
			if !errors.Is(err, orchestrator.ErrInvalid) {
				t.Fatalf("error %v is not a 400", err)
			}
			return
		}
		m := req.Volumes[0]
		if err := runtime.CheckMountPath(m.Path); err != nil || checkVolumeName(m.Name) != nil {
			t.Fatalf("accepted %+v: %v", m, err)
		}
	})
}

// TestVolumeDeleteRacesMounts: creates resolving a volume and a delete run
// at once; a create that resolved the volume finds its files there until
// it is done, whatever the delete does.
func TestVolumeDeleteRacesMounts(t *testing.T) {
	s, dirs, alice, _ := volumeServer(t)
	v := createVolume(t, s, alice, "data")
	k, err := s.opts.Store.VerifyAPIKey(context.Background(), alice)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				req, _ := parseNewSandbox([]byte(`{"templateID":"b","volumeMounts":[{"name":"data","path":"/d"}]}`), 2)
				req.Owner = ownerOf(k)
				release, err := s.resolveVolumes(context.Background(), &req)
				if err != nil {
					return // deleted: later creates find no such volume
				}
				if _, err := os.Stat(dirs.Path(v.VolumeID)); err != nil {
					errs <- fmt.Errorf("a pinned volume lost its directory: %w", err)
				}
				release()
			}
		}()
	}
	deleted := false
	for !deleted {
		w := do(s, "DELETE", "/volumes/"+v.VolumeID, alice, "", "")
		switch w.Code {
		case http.StatusNoContent:
			deleted = true
		case http.StatusConflict:
		default:
			t.Fatalf("delete: %d %s", w.Code, w.Body)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestVolumeContentCORS: a page may call the content API, PATCH
// (updateMetadata) and the Authorization header included.
func TestVolumeContentCORS(t *testing.T) {
	s, _, _, _ := volumeServer(t)
	w := call(s, "192.0.2.1:1", "OPTIONS", "/volumecontent/x/path?path=/a", "", map[string]string{
		"Origin": "https://app.example", "Access-Control-Request-Method": "PATCH", "Access-Control-Request-Headers": "authorization, content-type"})
	h := w.Header()
	if w.Code != http.StatusNoContent || !strings.Contains(h.Get("Access-Control-Allow-Methods"), "PATCH") ||
		!strings.Contains(strings.ToLower(h.Get("Access-Control-Allow-Headers")), "authorization") {
		t.Fatalf("preflight: %d %v", w.Code, h)
	}
}
