package api

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/store"
)

// snapshotInfo is E2B's SnapshotInfo: the snapshot's ID as a templateID
// (with its tag) and its names.
type snapshotInfo struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

func snapshotJSON(sn store.Snapshot) snapshotInfo {
	out := snapshotInfo{SnapshotID: sn.ID + ":" + orchestrator.SnapshotTag, Names: []string{}}
	if sn.Name != "" {
		out.SnapshotID = sn.Name + ":" + orchestrator.SnapshotTag
		out.Names = append(out.Names, out.SnapshotID)
	}
	return out
}

// createSnapshot is POST /sandboxes/{id}/snapshots {name?}.
func (s *Server) createSnapshot(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	var body struct {
		Name *string `json:"name"`
	}
	if err := decode(r, &body, true); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	name := ""
	if body.Name != nil {
		name = *body.Name
	}
	sn, err := s.opts.Orchestrator.Snapshot(r.Context(), sb.ID, name)
	if errors.Is(err, store.ErrNameTaken) {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	if err != nil {
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, snapshotJSON(sn))
}

// maxSnapshotPage bounds GET /snapshots' limit, as E2B's pagination does.
const maxSnapshotPage = 100

// listSnapshots is GET /snapshots?sandboxID=&name=&limit=&nextToken=.
func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := maxSnapshotPage
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxSnapshotPage {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("limit must be between 1 and %d", maxSnapshotPage))
			return
		}
		limit = n
	}
	// One more than asked: whether there is a next page.
	sns, err := s.opts.Orchestrator.ListSnapshots(r.Context(), store.SnapshotFilter{
		Owner: requestOwner(r.Context()), SandboxID: q.Get("sandboxID"), Name: q.Get("name"),
		After: q.Get("nextToken"), Limit: limit + 1,
	})
	if err != nil {
		s.fail(w, err)
		return
	}
	if len(sns) > limit {
		sns = sns[:limit]
		w.Header().Set("X-Next-Token", sns[limit-1].ID)
	}
	out := make([]snapshotInfo, 0, len(sns))
	for _, sn := range sns {
		out = append(out, snapshotJSON(sn))
	}
	writeJSON(w, http.StatusOK, out)
}

// deleteTemplate is DELETE /templates/{id}: a snapshot (snapshots are
// templates, and are deleted as such) or a template the owner built.
func (s *Server) deleteTemplate(w http.ResponseWriter, r *http.Request) {
	owner, id := requestOwner(r.Context()), r.PathValue("id")
	err := s.opts.Orchestrator.DeleteSnapshot(r.Context(), owner, id)
	if errors.Is(err, orchestrator.ErrTemplateNotFound) && s.opts.Templates != nil {
		s.deleteBuiltTemplate(w, r, owner, id)
		return
	}
	if err != nil {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// forkResult is E2B's SandboxForkResult: a sandbox or the error that kept
// it from starting.
type forkResult struct {
	Sandbox *sandboxJSON `json:"sandbox,omitempty"`
	Error   *apiError    `json:"error,omitempty"`
}

// fork is POST /sandboxes/{id}/fork {timeout?, count?}.
func (s *Server) fork(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	var body struct {
		Timeout *int64 `json:"timeout"`
		Count   *int64 `json:"count"`
	}
	if err := decode(r, &body, true); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	count := int64(1)
	if body.Count != nil {
		count = *body.Count
	}
	if count < 1 || count > orchestrator.MaxForks {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("count must be between 1 and %d", orchestrator.MaxForks))
		return
	}
	d, err := secondsOr(body.Timeout, 15) // E2B's default for forks
	if err != nil {
		s.fail(w, err)
		return
	}
	res, err := s.opts.Orchestrator.Fork(r.Context(), sb.ID, int(count), d)
	if err != nil {
		s.fail(w, err)
		return
	}
	out := make([]forkResult, len(res))
	for i, fr := range res {
		if fr.Err != nil {
			code, msg := s.errorOf(fr.Err)
			out[i].Error = &apiError{Code: code, Message: msg}
			continue
		}
		js := s.sandboxJSON(fr.Info)
		out[i].Sandbox = &js
	}
	writeJSON(w, http.StatusCreated, out)
}
