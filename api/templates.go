package api

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cubicle-dev/cubicle/template"
	"github.com/cubicle-dev/cubicle/template/builder"
	"github.com/cubicle-dev/cubicle/template/buildspec"
	"github.com/cubicle-dev/cubicle/template/uploads"
)

// Templates is what the template API needs: the registry, the build
// manager and the upload store. Nil answers template builds with 501.
type Templates struct {
	Registry *template.Registry
	Builds   *builder.Manager
	Uploads  *uploads.Store
	// InUse says why a template may not be deleted ("" if it may): live
	// sandboxes or snapshots made from it.
	InUse func(templateID string) string
}

// uploadURLLifetime bounds how long an upload URL handed to the SDK works.
const uploadURLLifetime = time.Hour

// templateName is E2B's template name: an alias, optionally with a tag.
var templateName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}(:[a-zA-Z0-9_.-]{1,64})?$`)

func (s *Server) templateRoutes(m *http.ServeMux, auth func(http.Handler) http.Handler) {
	s.uploadKey = make([]byte, 32)
	rand.Read(s.uploadKey)
	h := func(pattern string, fn http.HandlerFunc) { m.Handle(pattern, auth(s.templatesOn(fn))) }
	h("POST /v3/templates", s.createTemplate)
	h("POST /v2/templates", s.createTemplate)
	h("POST /templates", s.createTemplate)
	h("GET /templates", s.listTemplates)
	h("GET /v2/templates", s.listTemplates)
	h("GET /templates/aliases/{alias}", s.templateAlias)
	h("PATCH /v2/templates/{id}", s.updateTemplate)
	h("PATCH /templates/{id}", s.updateTemplate)
	h("GET /templates/{id}", s.getTemplate)
	h("GET /templates/{id}/files/{hash}", s.templateFiles)
	h("POST /v2/templates/{id}/builds/{buildID}", s.startBuild)
	h("GET /templates/{id}/builds/{buildID}/status", s.buildStatus)
	// The SDK PUTs to the URL templateFiles gave it, without the API key:
	// the URL's signature is the authorization.
	m.Handle("PUT /templates/{id}/files/{hash}", s.templatesOn(s.uploadFiles))
}

// templatesOn answers 501 when this server builds no templates.
func (s *Server) templatesOn(fn http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.opts.Templates == nil {
			writeError(w, http.StatusNotImplemented, "building templates is not available on this server (it needs runsc)")
			return
		}
		fn(w, r)
	})
}

// visible reports whether owner may see and use t: its own, or a built-in.
func visible(t template.Template, owner string) bool {
	return t.Owner == "" || t.Owner == owner || t.Public
}

// createTemplate is POST /v3/templates {name, tags?, cpuCount?, memoryMB?}:
// a template (new, or the owner's of that name) with a build waiting for
// its steps.
func (s *Server) createTemplate(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Name     string   `json:"name"`
		Alias    string   `json:"alias"`
		Tags     []string `json:"tags"`
		CPUCount *int     `json:"cpuCount"`
		MemoryMB *int     `json:"memoryMB"`
	}
	if err := decode(r, &body, false); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	name := body.Name
	if name == "" {
		name = body.Alias
	}
	if !templateName.MatchString(name) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("template name %q: lowercase letters, digits, '-' and '_' (up to 63), optionally :tag", name))
		return
	}
	alias, _, _ := strings.Cut(name, ":")
	cpus, mem := template.DefaultCPUCount, template.DefaultMemoryMB
	if body.CPUCount != nil {
		cpus = *body.CPUCount
	}
	if body.MemoryMB != nil {
		mem = *body.MemoryMB
	}
	if cpus < 1 || cpus > 64 || mem < 128 || mem > 256<<10 {
		writeError(w, http.StatusBadRequest, "cpuCount must be 1 to 64 and memoryMB 128 to 262144")
		return
	}
	owner := requestOwner(r.Context())
	tmpls := s.opts.Templates
	id := template.NewID()
	if t, err := tmpls.Registry.Get(alias); err == nil {
		if t.Owner == "" || t.Owner != owner {
			writeError(w, http.StatusConflict, fmt.Sprintf("the name %q is taken", alias))
			return
		}
		id = t.TemplateID // a new build of the owner's template
	}
	buildID := newBuildID()
	if err := tmpls.Builds.Register(builder.Info{BuildID: buildID, TemplateID: id, Alias: alias, Owner: owner,
		CPUCount: cpus, MemoryMB: mem}); err != nil {
		s.fail(w, err)
		return
	}
	tags := body.Tags
	if tags == nil {
		tags = []string{}
	}
	writeJSON(w, http.StatusAccepted, map[string]any{
		"templateID": id, "buildID": buildID, "names": []string{alias}, "aliases": []string{alias},
		"tags": tags, "public": false,
	})
}

func newBuildID() string {
	b := make([]byte, 16)
	rand.Read(b)
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// ownsTemplate reports whether owner may build templateID: its builds
// are owner's, and so is the template if it exists.
func (s *Server) ownsTemplate(owner, templateID string) bool {
	if !template.ValidID(templateID) {
		return false
	}
	if t, err := s.opts.Templates.Registry.Get(templateID); err == nil {
		return t.Owner != "" && t.Owner == owner
	}
	return s.opts.Templates.Builds.OwnerOf(templateID) == owner
}

// templateFiles is GET /templates/{id}/files/{hash}: whether the server has
// a COPY step's files, and where to PUT them (a URL signed for an hour).
func (s *Server) templateFiles(w http.ResponseWriter, r *http.Request) {
	id, hash := r.PathValue("id"), r.PathValue("hash")
	if !s.ownsTemplate(requestOwner(r.Context()), id) {
		writeError(w, http.StatusNotFound, "template not found")
		return
	}
	if !buildspec.ValidFilesHash(hash) {
		writeError(w, http.StatusBadRequest, "files hash must be 64 hexadecimal digits")
		return
	}
	exp := strconv.FormatInt(time.Now().Add(uploadURLLifetime).Unix(), 10)
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	u := url.URL{Scheme: scheme, Host: r.Host, Path: "/templates/" + id + "/files/" + hash,
		RawQuery: url.Values{"expires": {exp}, "signature": {s.uploadSignature(id, hash, exp)}}.Encode()}
	// The URL is given even when the files are there: the SDK's
	// forceUpload PUTs again.
	writeJSON(w, http.StatusCreated, map[string]any{"present": s.opts.Templates.Uploads.Has(hash), "url": u.String()})
}

func (s *Server) uploadSignature(id, hash, exp string) string {
	m := hmac.New(sha256.New, s.uploadKey)
	fmt.Fprintf(m, "upload\x00%s\x00%s\x00%s", id, hash, exp)
	return hex.EncodeToString(m.Sum(nil))
}

// uploadFiles is the PUT of a signed upload URL: the COPY step's tar.
func (s *Server) uploadFiles(w http.ResponseWriter, r *http.Request) {
	id, hash := r.PathValue("id"), r.PathValue("hash")
	q := r.URL.Query()
	exp, sig := q.Get("expires"), q.Get("signature")
	n, err := strconv.ParseInt(exp, 10, 64)
	if err != nil || !hmac.Equal([]byte(sig), []byte(s.uploadSignature(id, hash, exp))) {
		writeError(w, http.StatusForbidden, "the upload URL's signature is not valid")
		return
	}
	if time.Now().Unix() > n {
		writeError(w, http.StatusForbidden, "the upload URL has expired: ask for a new one")
		return
	}
	if _, err := s.opts.Templates.Uploads.Put(hash, r.Body); err != nil {
		code := http.StatusBadRequest
		if !errors.Is(err, uploads.ErrBadUpload) && !errors.Is(err, uploads.ErrTooLarge) {
			code = http.StatusInternalServerError
		}
		writeError(w, code, "upload refused: "+err.Error())
		return
	}
	w.WriteHeader(http.StatusOK)
}

// startBuild is POST /v2/templates/{id}/builds/{buildID}: the steps.
func (s *Server) startBuild(w http.ResponseWriter, r *http.Request) {
	id, buildID := r.PathValue("id"), r.PathValue("buildID")
	body, err := io.ReadAll(io.LimitReader(r.Body, buildspec.MaxBodyBytes+1))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if len(body) > buildspec.MaxBodyBytes {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("build request larger than %d bytes", buildspec.MaxBodyBytes))
		return
	}
	spec, err := buildspec.Parse(body)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if why := s.opts.Templates.InUse(id); why != "" {
		writeError(w, http.StatusConflict, "the template is in use ("+why+"): a new build would replace the files under it; kill its sandboxes and delete its snapshots first, or build under another name")
		return
	}
	err = s.opts.Templates.Builds.Start(requestOwner(r.Context()), id, buildID, spec)
	switch {
	case errors.Is(err, builder.ErrNotFound):
		writeError(w, http.StatusNotFound, "build not found")
	case errors.Is(err, builder.ErrConflict):
		writeError(w, http.StatusConflict, err.Error())
	case err != nil:
		s.fail(w, err)
	default:
		w.WriteHeader(http.StatusAccepted)
	}
}

// buildStatus is GET /templates/{id}/builds/{buildID}/status?logsOffset=&limit=.
func (s *Server) buildStatus(w http.ResponseWriter, r *http.Request) {
	id, buildID := r.PathValue("id"), r.PathValue("buildID")
	info, err := s.opts.Templates.Builds.Get(requestOwner(r.Context()), id, buildID)
	if err != nil {
		writeError(w, http.StatusNotFound, "build not found")
		return
	}
	offset, limit := 0, 1000
	if v := r.URL.Query().Get("logsOffset"); v != "" {
		if offset, err = strconv.Atoi(v); err != nil || offset < 0 {
			writeError(w, http.StatusBadRequest, "logsOffset must be a non-negative integer")
			return
		}
	}
	if v := r.URL.Query().Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > 10000 {
			writeError(w, http.StatusBadRequest, "limit must be 1 to 10000")
			return
		}
	}
	entries, err := s.opts.Templates.Builds.Logs(buildID, offset, limit)
	if err != nil {
		s.fail(w, err)
		return
	}
	logs := make([]string, 0, len(entries))
	for _, e := range entries {
		logs = append(logs, e.Message)
	}
	out := map[string]any{"templateID": id, "buildID": buildID, "status": info.Status, "logEntries": entries, "logs": logs}
	if info.Reason != nil {
		out["reason"] = info.Reason
	}
	writeJSON(w, http.StatusOK, out)
}

// templateJSON is E2B's Template object.
func templateJSON(t template.Template) map[string]any {
	aliases := t.Aliases
	if aliases == nil {
		aliases = []string{}
	}
	return map[string]any{
		"templateID": t.TemplateID, "buildID": t.BuildID, "cpuCount": t.CPUCount, "memoryMB": t.MemoryMB,
		"diskSizeMB": t.DiskSizeMB, "public": t.Owner == "" || t.Public, "aliases": aliases, "names": aliases,
		"createdAt": t.CreatedAt, "updatedAt": t.CreatedAt, "envdVersion": t.EnvdVersion, "buildStatus": "ready",
	}
}

// listTemplates is GET /templates: the owner's and the built-in ones.
func (s *Server) listTemplates(w http.ResponseWriter, r *http.Request) {
	all, err := s.opts.Templates.Registry.List()
	if err != nil {
		s.fail(w, err)
		return
	}
	owner := requestOwner(r.Context())
	out := []map[string]any{}
	for _, t := range all {
		if visible(t, owner) {
			out = append(out, templateJSON(t))
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// getTemplate is GET /templates/{id}: E2B's TemplateWithBuilds, the
// template (by ID or name) with its builds, newest first. A template whose
// builds all failed is still found by its builds, so its logs can be read.
func (s *Server) getTemplate(w http.ResponseWriter, r *http.Request) {
	owner, ref := requestOwner(r.Context()), r.PathValue("id")
	tmpls := s.opts.Templates
	builds, err := tmpls.Builds.List(owner, ref)
	if err != nil {
		s.fail(w, err)
		return
	}
	var out map[string]any
	if t, err := tmpls.Registry.Get(ref); err == nil && visible(t, owner) {
		out = templateJSON(t)
		builds = slices.DeleteFunc(builds, func(b builder.Info) bool { return b.TemplateID != t.TemplateID })
	} else if len(builds) > 0 {
		// Never built: the newest build's template, as far as it exists.
		id, alias := builds[0].TemplateID, builds[0].Alias
		builds = slices.DeleteFunc(builds, func(b builder.Info) bool { return b.TemplateID != id })
		names := []string{}
		if alias != "" {
			names = []string{alias}
		}
		out = map[string]any{"templateID": id, "public": false, "aliases": names, "names": names,
			"cpuCount": builds[0].CPUCount, "memoryMB": builds[0].MemoryMB, "createdAt": builds[len(builds)-1].CreatedAt}
	} else {
		writeError(w, http.StatusNotFound, "template not found")
		return
	}
	list := make([]map[string]any, 0, len(builds))
	for _, b := range builds {
		e := map[string]any{"buildID": b.BuildID, "status": b.Status, "createdAt": b.CreatedAt, "updatedAt": b.CreatedAt,
			"cpuCount": b.CPUCount, "memoryMB": b.MemoryMB}
		if !b.FinishedAt.IsZero() {
			e["finishedAt"], e["updatedAt"] = b.FinishedAt, b.FinishedAt
		}
		list = append(list, e)
	}
	out["builds"] = list
	writeJSON(w, http.StatusOK, out)
}

// templateAlias is GET /templates/aliases/{alias}.
func (s *Server) templateAlias(w http.ResponseWriter, r *http.Request) {
	t, err := s.opts.Templates.Registry.Get(r.PathValue("alias"))
	if err != nil || !visible(t, requestOwner(r.Context())) {
		writeError(w, http.StatusNotFound, "template not found")
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"templateID": t.TemplateID, "public": t.Owner == "" || t.Public})
}

// deleteBuiltTemplate deletes owner's template id: 404 when it has none
// such, 409 while sandboxes, snapshots or a build use it.
func (s *Server) deleteBuiltTemplate(w http.ResponseWriter, r *http.Request, owner, id string) {
	tmpls := s.opts.Templates
	t, err := tmpls.Registry.Get(id)
	if err != nil || t.Owner != owner || t.Owner == "" {
		writeError(w, http.StatusNotFound, "template not found")
		return
	}
	if tmpls.Builds.Building(t.TemplateID) {
		writeError(w, http.StatusConflict, "the template is being built")
		return
	}
	if why := tmpls.InUse(t.TemplateID); why != "" {
		writeError(w, http.StatusConflict, "the template is in use: "+why)
		return
	}
	if err := tmpls.Registry.Delete(t.TemplateID); err != nil {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// updateTemplate is PATCH /v2/templates/{id} {public?}: a public template
// is seen and used by every key (read-only: only its owner builds,
// changes or deletes it).
func (s *Server) updateTemplate(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Public *bool `json:"public"`
	}
	if err := decode(r, &body, false); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	reg := s.opts.Templates.Registry
	t, err := reg.Get(r.PathValue("id"))
	if err != nil || t.Owner == "" || t.Owner != requestOwner(r.Context()) {
		writeError(w, http.StatusNotFound, "template not found")
		return
	}
	if body.Public != nil {
		t.Public = *body.Public
		if err := reg.Put(t); err != nil {
			s.fail(w, err)
			return
		}
	}
	names := t.Aliases
	if names == nil {
		names = []string{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"names": names})
}
