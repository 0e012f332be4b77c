package api

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/cubicle-dev/cubicle/orchestrator"
)

// TestFailHostFull: a create the host cannot hold is answered as E2B
// answers a team at its sandbox limit, 429 in its error shape, with the
// message saying what was exhausted (the SDKs show it in RateLimitError),
// and without a Retry-After that would make the SDKs wait and retry.
func TestFailHostFull(t *testing.T) {
	s := &Server{log: slog.Default()}
	w := httptest.NewRecorder()
	msg := "3.0 of 3.0 GiB memory promised to sandboxes; refused 512 MiB"
	s.fail(w, fmt.Errorf("orchestrator: start base sandbox: %w: %s", orchestrator.ErrHostFull, msg))
	var body apiError
	if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil {
		t.Fatalf("body %q: %v", w.Body, err)
	}
	want := "orchestrator: start base sandbox: host is full: " + msg
	if w.Code != http.StatusTooManyRequests || body.Code != 429 || body.Message != want {
		t.Fatalf("answered %d %+v, want 429 with %q", w.Code, body, want)
	}
	if ra := w.Header().Get("Retry-After"); ra != "" {
		t.Errorf("Retry-After %q on a full host", ra)
	}
}
