package api

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/template"
	"github.com/cubicle-dev/cubicle/template/builder"
	"github.com/cubicle-dev/cubicle/template/uploads"
)

// TestGetTemplateBuilds: GET /templates/{id} finds a template that has
// never been built by its ID or its name, with its builds newest first;
// another owner does not find it.
func TestGetTemplateBuilds(t *testing.T) {
	dir := t.TempDir()
	reg, err := template.Open(filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	builds, err := builder.NewManager(nil, filepath.Join(dir, "builds"), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer builds.Close()
	up, err := uploads.New(filepath.Join(dir, "uploads"), uploads.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	s, key := newTestServer(t, Options{Templates: &Templates{Registry: reg, Builds: builds, Uploads: up,
		InUse: func(string) string { return "" }}})
	_, other, err := s.opts.Store.CreateAPIKey(context.Background(), "other")
	if err != nil {
		t.Fatal(err)
	}
	send := func(method, path, key, body string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, path, strings.NewReader(body))
		r.RemoteAddr = "127.0.0.1:1"
		r.Header.Set("X-API-KEY", key)
		r.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		return w
	}
	var first, second struct{ TemplateID, BuildID string }
	for _, out := range []*struct{ TemplateID, BuildID string }{&first, &second} {
		w := send("POST", "/v3/templates", key, `{"name":"cli-app","cpuCount":2,"memoryMB":1024}`)
		if w.Code != http.StatusAccepted || json.Unmarshal(w.Body.Bytes(), out) != nil {
			t.Fatalf("POST /v3/templates: %d %s", w.Code, w.Body)
		}
	}
	// Neither is built: each create made a template of that name, and the
	// name finds the newest.
	for _, ref := range []string{second.TemplateID, "cli-app"} {
		w := send("GET", "/templates/"+ref, key, "")
		var got struct {
			TemplateID string   `json:"templateID"`
			Names      []string `json:"names"`
			CPUCount   int      `json:"cpuCount"`
			Builds     []struct {
				BuildID, Status string
			} `json:"builds"`
		}
		if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &got) != nil {
			t.Fatalf("GET /templates/%s: %d %s", ref, w.Code, w.Body)
		}
		if got.TemplateID != second.TemplateID || len(got.Names) != 1 || got.Names[0] != "cli-app" || got.CPUCount != 2 {
			t.Errorf("GET /templates/%s: %s", ref, w.Body)
		}
		if len(got.Builds) == 0 || got.Builds[0].BuildID != second.BuildID || got.Builds[0].Status != builder.StatusWaiting {
			t.Errorf("GET /templates/%s: builds %+v, want %s first", ref, got.Builds, second.BuildID)
		}
	}
	for _, c := range []struct{ ref, key string }{{second.TemplateID, other}, {"cli-app", other}, {"nope", key}} {
		if w := send("GET", "/templates/"+c.ref, c.key, ""); !isAPIError(w, http.StatusNotFound) {
			t.Errorf("GET /templates/%s: %d %s, want 404", c.ref, w.Code, w.Body)
		}
	}
}
