package api

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/cubicle-dev/cubicle/orchestrator"
)

func TestParseRollback(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
	}{
		{"tagged", `{"snapshotID":"abc:default"}`, "abc:default"},
		{"bare", `{"snapshotID":"cmd-2.sbx"}`, "cmd-2.sbx"},
		{"other fields ignored", `{"snapshotID":"abc","x":1}`, "abc"},
		{"empty body", ``, ""},
		{"blank body", "  \n", ""},
		{"malformed", `{"snapshotID":`, ""},
		{"not an object", `["abc"]`, ""},
		{"null", `null`, ""},
		{"no snapshotID", `{}`, ""},
		{"snake case is not it", `{"snapshot_id":"abc"}`, ""},
		{"null snapshotID", `{"snapshotID":null}`, ""},
		{"empty snapshotID", `{"snapshotID":""}`, ""},
		{"blank snapshotID", `{"snapshotID":"  "}`, ""},
		{"number", `{"snapshotID":42}`, ""},
		{"object", `{"snapshotID":{"id":"abc"}}`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseRollback([]byte(tc.body))
			if tc.want == "" {
				if !errors.Is(err, orchestrator.ErrInvalid) {
					t.Fatalf("got %q, %v; want ErrInvalid", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func FuzzParseRollback(f *testing.F) {
	for _, s := range []string{`{"snapshotID":"a:default"}`, `{}`, `{"snapshotID":1}`, `null`, `{`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		ref, err := parseRollback(body)
		if err != nil {
			if !errors.Is(err, orchestrator.ErrInvalid) {
				t.Fatalf("error %v is not ErrInvalid: the API would answer 500 for bad input", err)
			}
			return
		}
		if ref == "" {
			t.Fatal("accepted an empty snapshotID")
		}
	})
}

// TestRollbackErrors: what the orchestrator's Rollback returns for bad
// input reaches the client in E2B's shape with the right status.
func TestRollbackErrors(t *testing.T) {
	s := &Server{log: slog.Default()}
	for _, tc := range []struct {
		name string
		err  error
		want int
	}{
		{"unknown snapshot", fmt.Errorf("%w: sandbox x has no snapshot %q", orchestrator.ErrTemplateNotFound, "nope"), http.StatusNotFound},
		{"unknown sandbox", fmt.Errorf("%w: x", orchestrator.ErrNotFound), http.StatusNotFound},
		{"no snapshots here", fmt.Errorf("%w: the firecracker backend cannot snapshot sandboxes", orchestrator.ErrUnsupported), http.StatusNotImplemented},
		{"bad body", fmt.Errorf("%w: snapshotID is required", orchestrator.ErrInvalid), http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := httptest.NewRecorder()
			s.fail(w, tc.err)
			if !isAPIError(w, tc.want) {
				t.Fatalf("answered %d %s, want %d in E2B's shape", w.Code, w.Body, tc.want)
			}
		})
	}
}
