package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/store"
	"github.com/cubicle-dev/cubicle/volume"
)

// Volumes, E2B's way: persistent directories that outlive sandboxes.
//
//   - GET/POST /volumes, GET/DELETE /volumes/{volumeID}: the control plane,
//     authenticated by API key and walled by owner like sandboxes are
//     (owner.go): another owner's volume answers exactly as one that does
//     not exist, and lists show only the caller's.
//   - volumeMounts [{name, path}] in the create body mounts the caller's
//     volumes, by name, into the new sandbox.
//   - /volumecontent/{volumeID}/{dir,file,path}?path=…: the content API
//     the SDK's Volume file methods call (E2B_VOLUME_API_URL, or
//     https://api.<domain>), authenticated by the volume's own token
//     (Authorization: Bearer), served here on the API address. Paths are
//     confined to the volume by package volume.
//
// A volume mounted by a live or paused sandbox cannot be deleted (409),
// nor one a create in flight is about to mount: volumeLocks.

// volumeNameRE is E2B's rule for volume names.
var volumeNameRE = regexp.MustCompile(`^[a-zA-Z0-9_-]+$`)

// maxVolumeName bounds a name; maxVolumeMounts the mounts of one sandbox.
const (
	maxVolumeName   = 128
	maxVolumeMounts = 16
)

// errVolumeNotFound is the one answer for a volume the caller cannot see,
// whether it does not exist or is another owner's.
const errVolumeNotFound = "volume not found"

// volumeLocks serialises what must not interleave: a delete, and the
// creates that mount a volume. mu guards pinned, the count of creates in
// flight per volume ID; a delete holds mu while it checks pins and
// sandboxes and removes the volume, so a volume is never removed between
// a create resolving it and the sandbox being registered.
type volumeLocks struct {
	mu     sync.Mutex
	pinned map[string]int
}

func checkVolumeName(name string) error {
	if len(name) == 0 || len(name) > maxVolumeName || !volumeNameRE.MatchString(name) {
		return fmt.Errorf("%w: volume name %.64q must be 1 to %d characters matching ^[a-zA-Z0-9_-]+$", orchestrator.ErrInvalid, name, maxVolumeName)
	}
	return nil
}

// volumeRoutes registers the volume endpoints.
func (s *Server) volumeRoutes(m *http.ServeMux, auth func(http.Handler) http.Handler) {
	s.vols.pinned = map[string]int{}
	m.Handle("GET /volumes", auth(http.HandlerFunc(s.listVolumes)))
	m.Handle("POST /volumes", auth(http.HandlerFunc(s.createVolume)))
	m.Handle("GET /volumes/{volumeID}", auth(s.ownedVolume(s.getVolume)))
	m.Handle("DELETE /volumes/{volumeID}", auth(s.ownedVolume(s.deleteVolume)))

	c := func(pattern string, h contentHandler) { m.Handle(pattern, s.volumeToken(h)) }
	c("GET /volumecontent/{volumeID}/dir", s.listDir)
	c("POST /volumecontent/{volumeID}/dir", s.makeDir)
	c("GET /volumecontent/{volumeID}/file", s.readFile)
	c("PUT /volumecontent/{volumeID}/file", s.writeFile)
	c("GET /volumecontent/{volumeID}/path", s.statPath)
	c("PATCH /volumecontent/{volumeID}/path", s.setMeta)
	c("DELETE /volumecontent/{volumeID}/path", s.removePath)
}

// volumesOff answers when the server keeps no volumes.
func (s *Server) volumesOff(w http.ResponseWriter) bool {
	if s.opts.Volumes == nil {
		writeError(w, http.StatusNotImplemented, "volumes are not enabled on this cubicle server")
		return true
	}
	return false
}

// volumeJSON is E2B's Volume; volumeAndToken its VolumeAndToken (without
// domain, which E2B sends only for custom clusters).
type volumeJSON struct {
	VolumeID string `json:"volumeID"`
	Name     string `json:"name"`
}

type volumeAndToken struct {
	volumeJSON
	Token string `json:"token"`
}

func (s *Server) listVolumes(w http.ResponseWriter, r *http.Request) {
	if s.volumesOff(w) {
		return
	}
	owner := requestOwner(r.Context())
	out := []volumeJSON{}
	if owner != "" {
		vs, err := s.opts.Store.ListVolumes(r.Context(), owner)
		if err != nil {
			s.fail(w, err)
			return
		}
		for _, v := range vs {
			out = append(out, volumeJSON{VolumeID: v.ID, Name: v.Name})
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) createVolume(w http.ResponseWriter, r *http.Request) {
	if s.volumesOff(w) {
		return
	}
	var body struct {
		Name string `json:"name"`
	}
	if err := decode(r, &body, false); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if err := checkVolumeName(body.Name); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	owner := requestOwner(r.Context())
	if owner == "" {
		writeError(w, http.StatusUnauthorized, "invalid API key")
		return
	}
	v, err := s.opts.Store.CreateVolume(r.Context(), owner, body.Name)
	if errors.Is(err, store.ErrExists) {
		writeError(w, http.StatusConflict, fmt.Sprintf("a volume named %q already exists", body.Name))
		return
	}
	if err != nil {
		s.fail(w, err)
		return
	}
	if err := s.opts.Volumes.Create(v.ID); err != nil {
		// Nothing half-made: the row goes with the directory that failed.
		if derr := s.opts.Store.DeleteVolume(context.WithoutCancel(r.Context()), v.ID); derr != nil {
			s.log.Error("removing the record of a volume whose directory failed", "volume", v.ID, "err", derr)
		}
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, volumeAndToken{volumeJSON{v.ID, v.Name}, v.Token})
}

// volumeHandler serves a route that names a volume the caller owns.
type volumeHandler func(w http.ResponseWriter, r *http.Request, v store.Volume)

// ownedVolume resolves {volumeID} to a volume the caller owns, answering
// exactly as for one that does not exist when it is someone else's.
func (s *Server) ownedVolume(h volumeHandler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.volumesOff(w) {
			return
		}
		v, err := s.opts.Store.GetVolume(r.Context(), r.PathValue("volumeID"))
		if errors.Is(err, store.ErrNotFound) {
			writeError(w, http.StatusNotFound, errVolumeNotFound)
			return
		}
		if err != nil {
			s.fail(w, err)
			return
		}
		if owner := requestOwner(r.Context()); owner == "" || v.Owner != owner {
			writeError(w, http.StatusNotFound, errVolumeNotFound)
			return
		}
		h(w, r, v)
	})
}

func (s *Server) getVolume(w http.ResponseWriter, r *http.Request, v store.Volume) {
	writeJSON(w, http.StatusOK, volumeAndToken{volumeJSON{v.ID, v.Name}, v.Token})
}

// mountedBy names a live or paused sandbox that mounts volume id, if any.
func (s *Server) mountedBy(id string) (sandbox, state string) {
	if s.opts.Orchestrator == nil {
		return "", ""
	}
	for _, sb := range s.opts.Orchestrator.All() {
		in := sb.Info()
		for _, m := range in.Volumes {
			if m.VolumeID == id {
				return in.ID, in.State
			}
		}
	}
	return "", ""
}

func (s *Server) deleteVolume(w http.ResponseWriter, r *http.Request, v store.Volume) {
	s.vols.mu.Lock()
	defer s.vols.mu.Unlock()
	if s.vols.pinned[v.ID] > 0 {
		writeError(w, http.StatusConflict, fmt.Sprintf("volume %q is being mounted by a sandbox that is starting: try again once it runs, after killing it", v.Name))
		return
	}
	if sb, state := s.mountedBy(v.ID); sb != "" {
		writeError(w, http.StatusConflict, fmt.Sprintf("volume %q is mounted by sandbox %s (%s): kill the sandbox first; nothing was deleted", v.Name, sb, state))
		return
	}
	// The files first: a removal that fails part way leaves the volume
	// listed, to be deleted again, never files that no volume names.
	if err := s.opts.Volumes.Remove(v.ID); err != nil {
		s.fail(w, err)
		return
	}
	if err := s.opts.Store.DeleteVolume(r.Context(), v.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// volumeMount is one entry of the create body's volumeMounts.
type volumeMount struct {
	Name string `json:"name"`
	Path string `json:"path"`
}

// mountsJSON is what sandbox objects say of their volumes.
func mountsJSON(vs []store.VolumeMount) []volumeMount {
	if len(vs) == 0 {
		return nil
	}
	out := make([]volumeMount, len(vs))
	for i, v := range vs {
		out[i] = volumeMount{Name: v.Name, Path: v.Path}
	}
	return out
}

// parseVolumeMounts checks the create body's volumeMounts: names by E2B's
// rule, paths absolute (cleaned) and allowed (runtime.CheckMountPath),
// none overlapping. The volumes are resolved later (resolveVolumes): this
// is the pure half, fuzzed with the rest of the body.
func parseVolumeMounts(ms []volumeMount) ([]orchestrator.VolumeMount, error) {
	if len(ms) == 0 {
		return nil, nil
	}
	if len(ms) > maxVolumeMounts {
		return nil, fmt.Errorf("%w: volumeMounts: %d mounts; at most %d are allowed", orchestrator.ErrInvalid, len(ms), maxVolumeMounts)
	}
	out := make([]orchestrator.VolumeMount, len(ms))
	rvs := make([]runtime.VolumeMount, len(ms))
	for i, m := range ms {
		if err := checkVolumeName(m.Name); err != nil {
			return nil, fmt.Errorf("volumeMounts[%d]: %w", i, err)
		}
		if !path.IsAbs(m.Path) {
			return nil, fmt.Errorf("%w: volumeMounts[%d]: path %.64q must be absolute", orchestrator.ErrInvalid, i, m.Path)
		}
		p := path.Clean(m.Path)
		out[i].Name, out[i].Path = m.Name, p
		rvs[i] = runtime.VolumeMount{HostDir: "/", Path: p}
	}
	if err := runtime.CheckVolumes(rvs); err != nil {
		return nil, fmt.Errorf("%w: volumeMounts: %v", orchestrator.ErrInvalid, err)
	}
	return out, nil
}

// resolveVolumes turns req's volume names into the owner's volumes and
// pins them against deletion until the returned release is called (after
// the create returned, by when its sandbox, if any, is registered).
func (s *Server) resolveVolumes(ctx context.Context, req *orchestrator.CreateRequest) (release func(), err error) {
	if len(req.Volumes) == 0 {
		return func() {}, nil
	}
	if s.opts.Volumes == nil {
		return nil, fmt.Errorf("%w: volumes are not enabled on this cubicle server", orchestrator.ErrInvalid)
	}
	s.vols.mu.Lock()
	defer s.vols.mu.Unlock()
	for i := range req.Volumes {
		m := &req.Volumes[i]
		v, err := s.opts.Store.VolumeByName(ctx, req.Owner, m.Name)
		if errors.Is(err, store.ErrNotFound) {
			return nil, fmt.Errorf("%w: volumeMounts[%d]: no volume named %q: create it first (POST /volumes)", orchestrator.ErrInvalid, i, m.Name)
		}
		if err != nil {
			return nil, err
		}
		m.VolumeID, m.HostDir = v.ID, s.opts.Volumes.Path(v.ID)
	}
	ids := make([]string, len(req.Volumes))
	for i, m := range req.Volumes {
		ids[i] = m.VolumeID
		s.vols.pinned[m.VolumeID]++
	}
	return func() {
		s.vols.mu.Lock()
		defer s.vols.mu.Unlock()
		for _, id := range ids {
			if s.vols.pinned[id]--; s.vols.pinned[id] <= 0 {
				delete(s.vols.pinned, id)
			}
		}
	}, nil
}

// contentHandler serves a content request on an opened volume, for the
// cleaned path of its ?path=.
type contentHandler func(w http.ResponseWriter, r *http.Request, root *volume.Root, p string)

// volumeToken authenticates a content request by the volume's token
// (Authorization: Bearer <token>, as the SDK sends it). An unknown volume
// and a wrong token answer alike; failures count against the source as
// failed API keys do.
func (s *Server) volumeToken(h contentHandler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.volumesOff(w) {
			return
		}
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || tok == "" {
			writeError(w, http.StatusUnauthorized, "missing volume token: send it as Authorization: Bearer <token>")
			return
		}
		src := sourceOf(r, s.opts.TrustedProxies)
		if ok, wait := s.authLim.take(src, time.Now()); !ok {
			w.Header().Set("Retry-After", strconv.Itoa(int(wait/time.Second)+1))
			writeError(w, http.StatusTooManyRequests, "too many requests with invalid tokens from this address: retry later")
			return
		}
		v, err := s.opts.Store.VerifyVolumeToken(r.Context(), r.PathValue("volumeID"), tok)
		if errors.Is(err, store.ErrNotFound) {
			writeError(w, http.StatusUnauthorized, "invalid volume token")
			return
		}
		s.authLim.refund(src)
		if err != nil {
			s.fail(w, err)
			return
		}
		q := r.URL.Query()
		if !q.Has("path") {
			writeError(w, http.StatusBadRequest, "the path query parameter is required")
			return
		}
		p, err := volume.Clean(q.Get("path"))
		if err != nil {
			s.failContent(w, err)
			return
		}
		root, err := s.opts.Volumes.Root(v.ID)
		if err != nil {
			// Its directory went missing under the server: say so
			// without the host's paths.
			s.log.Error("opening a volume's directory", "volume", v.ID, "err", err)
			writeError(w, http.StatusInternalServerError, "cannot open the volume's files")
			return
		}
		defer root.Close()
		h(w, r, root, p)
	})
}

// failContent maps a volume error to its answer.
func (s *Server) failContent(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, volume.ErrNotFound):
		writeError(w, http.StatusNotFound, err.Error())
	case errors.Is(err, volume.ErrExists):
		writeError(w, http.StatusConflict, err.Error())
	case errors.Is(err, volume.ErrInvalid):
		writeError(w, http.StatusBadRequest, err.Error())
	default:
		s.fail(w, err)
	}
}

// entryJSON is the content API's VolumeEntryStat.
type entryJSON struct {
	Name   string    `json:"name"`
	Path   string    `json:"path"`
	Type   string    `json:"type"`
	Size   int64     `json:"size"`
	Mode   uint32    `json:"mode"`
	UID    uint32    `json:"uid"`
	GID    uint32    `json:"gid"`
	Atime  time.Time `json:"atime"`
	Mtime  time.Time `json:"mtime"`
	Ctime  time.Time `json:"ctime"`
	Target string    `json:"target,omitempty"`
}

func entryOf(e volume.Entry) entryJSON {
	return entryJSON{Name: e.Name, Path: e.Path, Type: e.Type, Size: e.Size, Mode: e.Mode, UID: e.UID, GID: e.GID,
		Atime: e.Atime, Mtime: e.Mtime, Ctime: e.Ctime, Target: e.Target}
}

// metaQuery reads uid, gid and mode from the query, and force.
func metaQuery(r *http.Request) (m volume.Meta, force bool, err error) {
	q := r.URL.Query()
	for _, f := range []struct {
		name string
		dst  **uint32
	}{{"uid", &m.UID}, {"gid", &m.GID}, {"mode", &m.Mode}} {
		if v := q.Get(f.name); v != "" {
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return m, false, fmt.Errorf("%w: %s must be a non-negative integer", volume.ErrInvalid, f.name)
			}
			u := uint32(n)
			*f.dst = &u
		}
	}
	if v := q.Get("force"); v != "" {
		if force, err = strconv.ParseBool(v); err != nil {
			return m, false, fmt.Errorf("%w: force must be true or false", volume.ErrInvalid)
		}
	}
	return m, force, nil
}

func (s *Server) listDir(w http.ResponseWriter, r *http.Request, root *volume.Root, p string) {
	depth := 1
	if v := r.URL.Query().Get("depth"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			writeError(w, http.StatusBadRequest, "depth must be an integer")
			return
		}
		depth = n
	}
	es, err := root.List(p, depth)
	if err != nil {
		s.failContent(w, err)
		return
	}
	out := make([]entryJSON, len(es))
	for i, e := range es {
		out[i] = entryOf(e)
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) makeDir(w http.ResponseWriter, r *http.Request, root *volume.Root, p string) {
	m, force, err := metaQuery(r)
	if err != nil {
		s.failContent(w, err)
		return
	}
	e, err := root.MakeDir(p, force, m)
	if err != nil {
		s.failContent(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, entryOf(e))
}

func (s *Server) readFile(w http.ResponseWriter, r *http.Request, root *volume.Root, p string) {
	f, err := root.ReadFile(p)
	if err != nil {
		s.failContent(w, err)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		s.fail(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(fi.Size(), 10))
	w.WriteHeader(http.StatusOK)
	if _, err := io.CopyN(w, f, fi.Size()); err != nil {
		s.log.Debug("sending a volume file", "path", p, "err", err)
	}
}

func (s *Server) writeFile(w http.ResponseWriter, r *http.Request, root *volume.Root, p string) {
	m, force, err := metaQuery(r)
	if err != nil {
		s.failContent(w, err)
		return
	}
	e, err := root.WriteFile(p, r.Body, force, m)
	if err != nil {
		s.failContent(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, entryOf(e))
}

func (s *Server) statPath(w http.ResponseWriter, r *http.Request, root *volume.Root, p string) {
	e, err := root.Stat(p)
	if err != nil {
		s.failContent(w, err)
		return
	}
	writeJSON(w, http.StatusOK, entryOf(e))
}

func (s *Server) setMeta(w http.ResponseWriter, r *http.Request, root *volume.Root, p string) {
	var body struct {
		UID  *uint32 `json:"uid"`
		GID  *uint32 `json:"gid"`
		Mode *uint32 `json:"mode"`
	}
	if err := decode(r, &body, false); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	e, err := root.SetMeta(p, volume.Meta{UID: body.UID, GID: body.GID, Mode: body.Mode})
	if err != nil {
		s.failContent(w, err)
		return
	}
	writeJSON(w, http.StatusOK, entryOf(e))
}

func (s *Server) removePath(w http.ResponseWriter, r *http.Request, root *volume.Root, p string) {
	if err := root.Remove(p); err != nil {
		s.failContent(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
