package api

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestHealthIsolation: GET /health keeps its status and says which
// sandbox backend serves (serve's --isolation choice).
func TestHealthIsolation(t *testing.T) {
	for _, iso := range []string{"", "microvm", "gvisor"} {
		s := New(Options{Isolation: iso})
		w := httptest.NewRecorder()
		s.ServeHTTP(w, httptest.NewRequest("GET", "/health", nil))
		var body map[string]string
		if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &body) != nil {
			t.Fatalf("%q: %d %s", iso, w.Code, w.Body)
		}
		if body["status"] != "ok" || body["isolation"] != iso {
			t.Errorf("isolation %q: body %v", iso, body)
		}
	}
}
