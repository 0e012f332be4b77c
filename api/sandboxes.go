package api

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cubicle-dev/cubicle/network/egress"
	"github.com/cubicle-dev/cubicle/orchestrator"
)

// newSandbox is the body of POST /sandboxes and /v2/sandboxes. Unknown
// fields (mcp, iam, …) are ignored, as E2B's API does.
type newSandbox struct {
	TemplateID string `json:"templateID"`
	Timeout    *int64 `json:"timeout"`
	AutoPause  *bool  `json:"autoPause"`
	// AutoPauseMemory false makes the timeout's pause keep only files.
	AutoPauseMemory *bool             `json:"autoPauseMemory"`
	AutoResume      json.RawMessage   `json:"autoResume"`
	Secure          *bool             `json:"secure"`
	AllowInternet   *bool             `json:"allow_internet_access"`
	Network         *networkConfig    `json:"network"`
	Metadata        map[string]string `json:"metadata"`
	EnvVars         map[string]string `json:"envVars"`
	VolumeMounts    []volumeMount     `json:"volumeMounts"` // volumes.go
}

type networkConfig struct {
	AllowOut           []string `json:"allowOut,omitempty"`
	DenyOut            []string `json:"denyOut,omitempty"`
	AllowPublicTraffic *bool    `json:"allowPublicTraffic,omitempty"`
	MaskRequestHost    *string  `json:"maskRequestHost,omitempty"`
}

// autoResume accepts both shapes the SDKs send: a bool or {"enabled": bool}.
func parseAutoResume(raw json.RawMessage) (bool, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return false, nil
	}
	var b bool
	if err := json.Unmarshal(raw, &b); err == nil {
		return b, nil
	}
	var obj struct {
		Enabled bool `json:"enabled"`
	}
	if err := json.Unmarshal(raw, &obj); err != nil {
		return false, fmt.Errorf("%w: autoResume must be a boolean or {\"enabled\": boolean}", orchestrator.ErrInvalid)
	}
	return obj.Enabled, nil
}

// sandboxJSON is E2B's Sandbox object.
type sandboxJSON struct {
	TemplateID         string  `json:"templateID"`
	SandboxID          string  `json:"sandboxID"`
	Alias              string  `json:"alias,omitempty"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
	Domain             *string `json:"domain"`
}

func (s *Server) sandboxJSON(in orchestrator.Info) sandboxJSON {
	out := sandboxJSON{
		TemplateID:      in.TemplateID,
		SandboxID:       in.ID,
		Alias:           in.Alias,
		ClientID:        ClientID,
		EnvdVersion:     s.opts.EnvdVersion,
		EnvdAccessToken: in.EnvdAccessToken,
	}
	if in.TrafficToken != "" {
		t := in.TrafficToken
		out.TrafficAccessToken = &t
	}
	if s.opts.Domain != "" {
		d := s.opts.Domain
		out.Domain = &d
	}
	return out
}

// listedSandbox is E2B's ListedSandbox object.
type listedSandbox struct {
	SandboxID   string            `json:"sandboxID"`
	TemplateID  string            `json:"templateID"`
	Alias       string            `json:"alias,omitempty"`
	ClientID    string            `json:"clientID"`
	StartedAt   time.Time         `json:"startedAt"`
	EndAt       time.Time         `json:"endAt"`
	CPUCount    int               `json:"cpuCount"`
	MemoryMB    int               `json:"memoryMB"`
	DiskSizeMB  int               `json:"diskSizeMB"`
	EnvdVersion string            `json:"envdVersion"`
	State       string            `json:"state"`
	Metadata    map[string]string `json:"metadata"`
	// VolumeMounts are the volumes mounted into the sandbox (volumes.go).
	VolumeMounts []volumeMount `json:"volumeMounts,omitempty"`
}

// sandboxDetail is E2B's SandboxDetail object.
type sandboxDetail struct {
	listedSandbox
	Domain              *string         `json:"domain"`
	EnvdAccessToken     string          `json:"envdAccessToken"`
	AllowInternetAccess bool            `json:"allowInternetAccess"`
	Network             json.RawMessage `json:"network,omitempty"`
	Lifecycle           lifecycle       `json:"lifecycle"`
}

type lifecycle struct {
	AutoResume bool   `json:"autoResume"`
	OnTimeout  string `json:"onTimeout"`
}

func (s *Server) listed(in orchestrator.Info) listedSandbox {
	md := in.Metadata
	if md == nil {
		md = map[string]string{}
	}
	return listedSandbox{
		SandboxID: in.ID, TemplateID: in.TemplateID, Alias: in.Alias, ClientID: ClientID,
		StartedAt: in.StartedAt, EndAt: in.EndAt, CPUCount: in.CPUCount, MemoryMB: in.MemoryMB,
		DiskSizeMB: in.DiskSizeMB, EnvdVersion: s.opts.EnvdVersion, State: in.State, Metadata: md,
		VolumeMounts: mountsJSON(in.Volumes),
	}
}

// parseNewSandbox validates a create body and turns it into an
// orchestrator request. It is the parser of untrusted input for create, so
// it is fuzzed.
func parseNewSandbox(raw []byte, version int) (orchestrator.CreateRequest, error) {
	var body newSandbox
	if err := decodeBytes(raw, &body, false); err != nil {
		return orchestrator.CreateRequest{}, err
	}
	if strings.TrimSpace(body.TemplateID) == "" {
		return orchestrator.CreateRequest{}, fmt.Errorf("%w: templateID is required", orchestrator.ErrInvalid)
	}
	timeout := int64(15)
	if version == 2 {
		timeout = 300
	}
	if body.Timeout != nil {
		timeout = *body.Timeout
	}
	d, err := seconds(timeout)
	if err != nil {
		return orchestrator.CreateRequest{}, err
	}
	autoResume, err := parseAutoResume(body.AutoResume)
	if err != nil {
		return orchestrator.CreateRequest{}, err
	}
	req := orchestrator.CreateRequest{
		Template:      body.TemplateID,
		Timeout:       d,
		AutoPause:     body.AutoPause != nil && *body.AutoPause,
		AutoResume:    autoResume,
		AllowInternet: body.AllowInternet == nil || *body.AllowInternet,
		PublicTraffic: true,
		Metadata:      body.Metadata,
		EnvVars:       body.EnvVars,
	}
	if err := checkMap("metadata", body.Metadata, metadataLimits); err != nil {
		return orchestrator.CreateRequest{}, err
	}
	if err := checkMap("envVars", body.EnvVars, envVarLimits); err != nil {
		return orchestrator.CreateRequest{}, err
	}
	if req.AutoResume && !req.AutoPause {
		return orchestrator.CreateRequest{}, fmt.Errorf("%w: autoResume requires autoPause", orchestrator.ErrInvalid)
	}
	if body.AutoPauseMemory != nil && !*body.AutoPauseMemory {
		if !req.AutoPause {
			return orchestrator.CreateRequest{}, fmt.Errorf("%w: autoPauseMemory is only allowed with autoPause", orchestrator.ErrInvalid)
		}
		if req.AutoResume {
			return orchestrator.CreateRequest{}, fmt.Errorf("%w: autoResume cannot wake a sandbox paused without its memory (autoPauseMemory false)", orchestrator.ErrInvalid)
		}
		req.AutoPauseFilesOnly = true
	}
	var allowOut, denyOut []string
	if body.Network != nil {
		if body.Network.AllowPublicTraffic != nil {
			req.PublicTraffic = *body.Network.AllowPublicTraffic
		}
		req.Network, _ = json.Marshal(body.Network)
		allowOut, denyOut = body.Network.AllowOut, body.Network.DenyOut
	}
	egress, err := parseEgress(req.AllowInternet, allowOut, denyOut)
	if err != nil {
		return orchestrator.CreateRequest{}, err
	}
	req.Egress = &egress
	if req.Volumes, err = parseVolumeMounts(body.VolumeMounts); err != nil {
		return orchestrator.CreateRequest{}, err
	}
	return req, nil
}

// mapLimits bound a string map a client sends at create.
type mapLimits struct {
	keys     int // entries
	keyLen   int // bytes of one key
	valueLen int // bytes of one value
	total    int // bytes of all keys and values
	envNames bool
}

// The bounds on metadata and environment variables. Metadata is kept in
// memory, in the store and in every list answer, so it is small: labels,
// not documents (E2B's SDKs use it for a handful of tags). Environment
// variables reach every process of the sandbox; they may be larger (a
// certificate, a token), but not a way to ship files, which the files API
// is for.
var (
	metadataLimits = mapLimits{keys: 64, keyLen: 256, valueLen: 2048, total: 16 << 10}
	envVarLimits   = mapLimits{keys: 256, keyLen: 256, valueLen: 32 << 10, total: 256 << 10, envNames: true}
)

// checkMap applies limits to one of the create body's maps.
func checkMap(name string, m map[string]string, l mapLimits) error {
	if len(m) > l.keys {
		return fmt.Errorf("%w: %s: %d entries; at most %d are allowed", orchestrator.ErrInvalid, name, len(m), l.keys)
	}
	total := 0
	for k, v := range m {
		switch {
		case k == "":
			return fmt.Errorf("%w: %s: an empty key", orchestrator.ErrInvalid, name)
		case len(k) > l.keyLen:
			return fmt.Errorf("%w: %s: key %.32q… is %d bytes; at most %d are allowed", orchestrator.ErrInvalid, name, k, len(k), l.keyLen)
		case len(v) > l.valueLen:
			return fmt.Errorf("%w: %s: the value of %.64q is %d bytes; at most %d are allowed", orchestrator.ErrInvalid, name, k, len(v), l.valueLen)
		case l.envNames && strings.ContainsAny(k, "=\x00"):
			return fmt.Errorf("%w: %s: %.64q is not a variable name (it holds '=' or NUL)", orchestrator.ErrInvalid, name, k)
		case l.envNames && strings.ContainsRune(v, 0):
			return fmt.Errorf("%w: %s: the value of %.64q holds a NUL byte", orchestrator.ErrInvalid, name, k)
		}
		total += len(k) + len(v)
	}
	if total > l.total {
		return fmt.Errorf("%w: %s: %d bytes in all; at most %d are allowed", orchestrator.ErrInvalid, name, total, l.total)
	}
	return nil
}

// parseEgress turns E2B's network fields into an egress policy with the
// one parser of them (egress.Parse); bad entries are the client's error.
func parseEgress(allowInternet bool, allowOut, denyOut []string) (egress.Policy, error) {
	p, err := egress.Parse(allowInternet, allowOut, denyOut)
	if err != nil {
		return egress.Policy{}, fmt.Errorf("%w: network: %v", orchestrator.ErrInvalid, err)
	}
	return p, nil
}

// networkUpdate is the body of PUT /sandboxes/{id}/network. It replaces the
// whole egress configuration: omitted fields are cleared.
type networkUpdate struct {
	AllowOut      []string `json:"allowOut"`
	DenyOut       []string `json:"denyOut"`
	AllowInternet *bool    `json:"allow_internet_access"`
}

func (s *Server) updateNetwork(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	raw, err := readBody(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	var body networkUpdate
	if err := decodeBytes(raw, &body, true); err != nil {
		s.fail(w, err)
		return
	}
	egress, err := parseEgress(body.AllowInternet == nil || *body.AllowInternet, body.AllowOut, body.DenyOut)
	if err != nil {
		s.fail(w, err)
		return
	}
	if err := s.opts.Orchestrator.SetNetwork(r.Context(), sb.ID, egress, raw); err != nil {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) create(version int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, err := readBody(r)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		req, err := parseNewSandbox(raw, version)
		if err != nil {
			s.fail(w, err)
			return
		}
		req.APIKeyID, _ = r.Context().Value(apiKeyCtx{}).(string)
		req.Owner = requestOwner(r.Context())
		release, err := s.resolveVolumes(r.Context(), &req)
		if err != nil {
			s.fail(w, err)
			return
		}
		defer release()
		info, err := s.opts.Orchestrator.Create(r.Context(), req)
		if err != nil {
			s.fail(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, s.sandboxJSON(info))
	})
}

func (s *Server) get(w http.ResponseWriter, r *http.Request, in orchestrator.Info) {
	d := sandboxDetail{
		listedSandbox:       s.listed(in),
		EnvdAccessToken:     in.EnvdAccessToken,
		AllowInternetAccess: in.AllowInternet,
		Network:             in.Network,
		Lifecycle:           lifecycle{AutoResume: in.AutoResume, OnTimeout: "kill"},
	}
	if in.AutoPause {
		d.Lifecycle.OnTimeout = "pause"
	}
	if s.opts.Domain != "" {
		dom := s.opts.Domain
		d.Domain = &dom
	}
	writeJSON(w, http.StatusOK, d)
}

func (s *Server) kill(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	if err := s.opts.Orchestrator.Kill(r.Context(), sb.ID); err != nil {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

type timeoutBody struct {
	Timeout *int64 `json:"timeout"`
}

func (s *Server) connect(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	var body timeoutBody
	if err := decode(r, &body, true); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	d, err := secondsOr(body.Timeout, 300)
	if err != nil {
		s.fail(w, err)
		return
	}
	info, resumed, err := s.opts.Orchestrator.Connect(r.Context(), sb.ID, d)
	if err != nil {
		s.fail(w, err)
		return
	}
	code := http.StatusOK
	if resumed {
		code = http.StatusCreated
	}
	writeJSON(w, code, s.sandboxJSON(info))
}

func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	var body timeoutBody
	if err := decode(r, &body, false); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if body.Timeout == nil {
		writeError(w, http.StatusBadRequest, "timeout is required")
		return
	}
	s.endIn(w, r, sb.ID, *body.Timeout)
}

// endIn sets the sandbox's end time to now + n seconds and answers 204.
func (s *Server) endIn(w http.ResponseWriter, r *http.Request, id string, n int64) {
	d, err := seconds(n)
	if err == nil {
		err = s.opts.Orchestrator.SetTimeout(r.Context(), id, d)
	}
	if err != nil {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) refresh(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	var body struct {
		Duration *int64 `json:"duration"`
	}
	if err := decode(r, &body, true); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	n := int64(60)
	if body.Duration != nil {
		n = *body.Duration
	}
	s.endIn(w, r, sb.ID, n)
}

func (s *Server) pause(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	var body struct {
		Memory *bool `json:"memory"`
	}
	if err := decode(r, &body, true); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	// memory false keeps only the files; absent or true keeps everything.
	opts := orchestrator.PauseOptions{FilesystemOnly: body.Memory != nil && !*body.Memory}
	if err := s.opts.Orchestrator.Pause(r.Context(), sb.ID, opts); err != nil {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) resume(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	var body struct {
		Timeout   *int64 `json:"timeout"`
		AutoPause *bool  `json:"autoPause"`
	}
	if err := decode(r, &body, true); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	d, err := secondsOr(body.Timeout, 15)
	if err != nil {
		s.fail(w, err)
		return
	}
	info, err := s.opts.Orchestrator.Resume(r.Context(), sb.ID, d)
	if err != nil {
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, s.sandboxJSON(info))
}

// sandboxMetric is E2B's SandboxMetric object, plus the sandbox's egress
// counters from the host's eBPF program (cumulative since the sandbox
// started; E2B's SDKs ignore fields they do not know).
type sandboxMetric struct {
	Timestamp     time.Time `json:"timestamp"`
	TimestampUnix int64     `json:"timestampUnix"`
	CPUCount      int       `json:"cpuCount"`
	CPUUsedPct    float64   `json:"cpuUsedPct"`
	MemUsed       uint64    `json:"memUsed"`
	MemTotal      uint64    `json:"memTotal"`
	MemCache      uint64    `json:"memCache"`
	DiskUsed      uint64    `json:"diskUsed"`
	DiskTotal     uint64    `json:"diskTotal"`

	EgressPackets        uint64 `json:"egressPackets"`
	EgressBytes          uint64 `json:"egressBytes"`
	EgressDroppedPackets uint64 `json:"egressDroppedPackets"`
	EgressDroppedBytes   uint64 `json:"egressDroppedBytes"`
}

func (s *Server) metrics(w http.ResponseWriter, r *http.Request, sb orchestrator.Info) {
	q := r.URL.Query()
	var start, end time.Time
	for _, p := range []struct {
		name string
		t    *time.Time
	}{{"start", &start}, {"end", &end}} {
		if v := q.Get(p.name); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				writeError(w, http.StatusBadRequest, p.name+" must be a unix time in seconds")
				return
			}
			*p.t = time.Unix(n, 0)
		}
	}
	ms, err := s.opts.Orchestrator.Metrics(r.Context(), sb.ID, start, end)
	if err != nil {
		s.fail(w, err)
		return
	}
	out := make([]sandboxMetric, 0, len(ms))
	for _, m := range ms {
		out = append(out, sandboxMetric{
			Timestamp: m.Timestamp, TimestampUnix: m.Timestamp.Unix(), CPUCount: m.CPUCount,
			CPUUsedPct: m.CPUUsedPct, MemUsed: m.MemUsed, MemTotal: m.MemTotal, MemCache: m.MemCache,
			DiskUsed: m.DiskUsed, DiskTotal: m.DiskTotal,
			EgressPackets: m.Egress.PassedPackets, EgressBytes: m.Egress.PassedBytes,
			EgressDroppedPackets: m.Egress.DroppedPackets, EgressDroppedBytes: m.Egress.DroppedBytes,
		})
	}
	writeJSON(w, http.StatusOK, out)
}

// listFilter is a parsed list query.
type listFilter struct {
	metadata     url.Values
	states       []string
	template     string
	startedAfter time.Time
}

func (f listFilter) match(in orchestrator.Info) bool {
	if len(f.states) > 0 && !slices.Contains(f.states, in.State) {
		return false
	}
	if f.template != "" && in.TemplateID != f.template && in.Alias != f.template {
		return false
	}
	if !f.startedAfter.IsZero() && !in.StartedAt.After(f.startedAfter) {
		return false
	}
	for k, vs := range f.metadata {
		if v, ok := in.Metadata[k]; !ok || !slices.Contains(vs, v) {
			return false
		}
	}
	return true
}

// parseMetadata parses E2B's metadata filter: a URL-encoded "k=v&k2=v2"
// whose parts are URL-encoded again.
func parseMetadata(raw string) (url.Values, error) {
	if raw == "" {
		return nil, nil
	}
	v, err := url.ParseQuery(raw)
	if err != nil {
		return nil, fmt.Errorf("metadata filter %q is not k=v&k2=v2: %w", raw, err)
	}
	return v, nil
}

func (s *Server) listV1(w http.ResponseWriter, r *http.Request) {
	md, err := parseMetadata(r.URL.Query().Get("metadata"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	f := listFilter{metadata: md, states: []string{orchestrator.StateRunning}}
	out := []listedSandbox{}
	for _, in := range s.sorted(r, false) {
		if f.match(in) {
			out = append(out, s.listed(in))
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// sorted returns the caller's sandboxes in list order.
func (s *Server) sorted(r *http.Request, asc bool) []orchestrator.Info {
	infos := s.ownedSandboxes(r)
	slices.SortFunc(infos, func(a, b orchestrator.Info) int {
		c := a.StartedAt.Compare(b.StartedAt)
		if c == 0 {
			c = strings.Compare(a.ID, b.ID)
		}
		if !asc {
			c = -c
		}
		return c
	})
	return infos
}

// pageToken marks the last item of a page: its start time and ID.
func pageToken(in orchestrator.Info) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(in.StartedAt.UnixNano(), 10) + "/" + in.ID))
}

func parsePageToken(tok string) (time.Time, string, error) {
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return time.Time{}, "", fmt.Errorf("invalid nextToken")
	}
	ns, id, ok := strings.Cut(string(raw), "/")
	n, err := strconv.ParseInt(ns, 10, 64)
	if !ok || err != nil || id == "" {
		return time.Time{}, "", fmt.Errorf("invalid nextToken")
	}
	return time.Unix(0, n).UTC(), id, nil
}

func (s *Server) listV2(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	md, err := parseMetadata(q.Get("metadata"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	f := listFilter{metadata: md, template: q.Get("template")}
	for _, st := range strings.Split(strings.Join(q["state"], ","), ",") {
		switch st = strings.TrimSpace(st); st {
		case "":
		case orchestrator.StateRunning, orchestrator.StatePaused:
			f.states = append(f.states, st)
		default:
			writeError(w, http.StatusBadRequest, fmt.Sprintf("unknown state %q: use running or paused", st))
			return
		}
	}
	if v := q.Get("startedAfter"); v != "" {
		if f.startedAfter, err = time.Parse(time.RFC3339Nano, v); err != nil {
			writeError(w, http.StatusBadRequest, "startedAfter must be an RFC3339 time")
			return
		}
	}
	limit := 100
	if v := q.Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > 100 {
			writeError(w, http.StatusBadRequest, "limit must be between 1 and 100")
			return
		}
	}
	asc := false
	switch q.Get("order") {
	case "", "desc":
	case "asc":
		asc = true
	default:
		writeError(w, http.StatusBadRequest, "order must be asc or desc")
		return
	}
	var afterT time.Time
	var afterID string
	if tok := q.Get("nextToken"); tok != "" {
		if afterT, afterID, err = parsePageToken(tok); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
	}
	out := []listedSandbox{}
	running := 0
	var last orchestrator.Info
	more := false
	for _, in := range s.sorted(r, asc) {
		if in.State == orchestrator.StateRunning {
			running++
		}
		if !f.match(in) {
			continue
		}
		if afterID != "" && !pastToken(in, afterT, afterID, asc) {
			continue
		}
		if len(out) == limit {
			more = true
			continue
		}
		out = append(out, s.listed(in))
		last = in
	}
	if more {
		w.Header().Set("X-Next-Token", pageToken(last))
	}
	w.Header().Set("X-Total-Running", strconv.Itoa(running))
	writeJSON(w, http.StatusOK, out)
}

// pastToken reports whether in comes after the page token in list order.
func pastToken(in orchestrator.Info, t time.Time, id string, asc bool) bool {
	c := in.StartedAt.Compare(t)
	if c == 0 {
		c = strings.Compare(in.ID, id)
	}
	if asc {
		return c > 0
	}
	return c < 0
}
