package api

import (
	"fmt"
	"net/http"
	"strings"

	"github.com/cubicle-dev/cubicle/orchestrator"
)

// rollback is POST /sandboxes/{id}/rollback {snapshotID}, a cubicle
// extension (E2B has no rollback): the sandbox goes back, in place, to one
// of its own snapshots, keeping its ID, tokens, metadata and end time
// (orchestrator/rollback.go). It answers as connect does, with the
// sandbox. A snapshotID that names no snapshot of this sandbox, or one of
// another sandbox or owner, is 404; a backend that cannot snapshot, 501.
func (s *Server) rollback(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	body, err := readBody(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	ref, err := parseRollback(body)
	if err != nil {
		s.fail(w, err)
		return
	}
	info, err := s.opts.Orchestrator.Rollback(r.Context(), sb.ID, ref)
	if err != nil {
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, s.sandboxJSON(info))
}

// parseRollback reads a rollback's body: the snapshotID, as GET /snapshots
// and POST /sandboxes/{id}/snapshots give it ("<id or name>:default") or
// bare.
func parseRollback(body []byte) (string, error) {
	var req struct {
		SnapshotID *string `json:"snapshotID"`
	}
	if err := decodeBytes(body, &req, false); err != nil {
		return "", err
	}
	if req.SnapshotID == nil || strings.TrimSpace(*req.SnapshotID) == "" {
		return "", fmt.Errorf("%w: snapshotID is required", orchestrator.ErrInvalid)
	}
	return *req.SnapshotID, nil
}
