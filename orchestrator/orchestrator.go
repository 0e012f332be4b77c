// Package orchestrator owns the lifecycle of sandboxes: it creates them from
// pooled, pre-started slots, initialises their envd, enforces timeouts
// (kill or auto-pause), pauses and resumes them, samples their metrics,
// ends the ones that die on their own (watch.go), and finds running
// sandboxes again when the server restarts. It owns each sandbox's network
// devices and their egress policy (network.go), which it hands the runtime
// ready to use. It knows nothing of HTTP; the api and proxy packages drive
// it.
//
// Concurrency: Orchestrator.mu guards the sandboxes map and the pools map
// only. Each Sandbox has its own mu that guards its record and serialises
// its state transitions (a kill and a pause of one sandbox never interleave).
// Lock order: never take Orchestrator.mu while holding a Sandbox.mu.
package orchestrator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cubicle-dev/cubicle/capacity"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/egress"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/store"
)

// Errors a caller may branch on.
var (
	ErrNotFound         = errors.New("sandbox not found")
	ErrTemplateNotFound = errors.New("template not found")
	ErrAlreadyPaused    = errors.New("sandbox is already paused")
	ErrNotPaused        = errors.New("sandbox is not paused")
	ErrInvalid          = errors.New("invalid request")
	ErrClosed           = errors.New("orchestrator is shutting down")
)

// States a sandbox can be in, as the E2B API names them.
const (
	StateRunning = "running"
	StatePaused  = "paused"
)

// EnvdUser is the default user processes run as, as in E2B templates.
const EnvdUser = "user"

// Template is what the orchestrator needs to know of a template.
type Template struct {
	ID         string
	Alias      string
	RootFS     string
	CPUCount   int
	MemoryMB   int
	DiskSizeMB int
	// StartCmd runs in every sandbox before it is handed out; ReadyCmd
	// tells when it serves (E2B's startCmd and readyCmd).
	StartCmd string
	ReadyCmd string
	// Env ("K=V"), User and Workdir are the defaults of its sandboxes'
	// processes (a built template's final ENV, USER and WORKDIR); User ""
	// is EnvdUser.
	Env     []string
	User    string
	Workdir string
	// Owner, when set, is the only owner who may use it, unless Public.
	Owner  string
	Public bool
	// base, for a snapshot used as a template, is the ID of the template
	// whose files its sandboxes see (store.Sandbox.BaseTemplate).
	base string
}

// Templates resolves a template ID or alias.
type Templates interface {
	Lookup(idOrAlias string) (Template, error)
}

// Options configure an Orchestrator.
type Options struct {
	Runtime   runtime.Runtime
	Store     *store.Store
	Templates Templates
	// Network is where each sandbox's network devices come from: claimed
	// before its runtime sandbox is made, released after it is destroyed
	// (network.go). Required.
	Network *network.Pool
	// Egress enforces sandboxes' egress policies on their devices; the
	// Network pool must then be made with its hooks
	// (egress.Enforcer.PoolOptions), which put every device under
	// egress.Default as it is made. Nil runs sandboxes with no policy and
	// the template's resolver (tests): asking for a policy fails with
	// ErrNoPolicy.
	Egress Egress
	// Envd and EnvdArgs are passed to the runtime for every sandbox.
	Envd     string
	EnvdArgs []string
	// PoolSize is how many pre-started sandboxes each template keeps ready.
	PoolSize int
	// PoolTemplates are templates whose pools fill at start; other templates
	// get a pool on first use.
	PoolTemplates []string
	// MaxTimeout caps every sandbox timeout.
	MaxTimeout time.Duration
	// OnEvict is called when a sandbox stops serving traffic (killed,
	// paused, expired) so that the data plane can cut its connections.
	OnEvict func(id string)
	// MetricsInterval is how often running sandboxes are sampled.
	MetricsInterval time.Duration
	// SnapshotDir holds snapshots and sandboxes paused to disk
	// (snapshot.go). Empty, or a runtime that is no runtime.Snapshotter,
	// answers snapshots and forks with ErrUnsupported and pauses in place.
	SnapshotDir string
	// Capacity, when set, admits each sandbox start (admission.go).
	Capacity *capacity.Ledger
	Logger   *slog.Logger
}

// Orchestrator is the sandbox lifecycle manager.
type Orchestrator struct {
	opts   Options
	log    *slog.Logger
	envd   *envdClient
	ctx    context.Context // cancelled by Close; parent of background work
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// filling counts pool fills under way and destroying teardowns under
	// way (admission.go waits for them).
	filling, destroying atomic.Int32

	mu        sync.Mutex
	sandboxes map[string]*Sandbox
	pools     map[string]*pool
	closed    bool
}

// Sandbox is one live sandbox. Read its fields through Info.
type Sandbox struct {
	mu   sync.Mutex
	rec  store.Sandbox
	addr netip.Addr
	// net is its network devices; zero for an adopted sandbox whose
	// devices were gone, and for one paused to disk (it gets new ones
	// when it resumes, and a new addr).
	net     network.Attachment
	gone    bool // killed; the record is being or has been removed
	metrics metricsRing
	// life is the watch on its runtime sandbox; nil while it is paused
	// to disk (it has none).
	life *life
	// stateEpoch counts pauses and resumes, so that a health probe that
	// raced one is ignored; probeFails counts failed probes in a row.
	stateEpoch int
	probeFails int
}

// Info is a consistent copy of a sandbox's record and address.
type Info struct {
	store.Sandbox
	Address netip.Addr
}

// Info returns a copy of the sandbox's state.
func (s *Sandbox) Info() Info {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.infoLocked()
}

func (s *Sandbox) infoLocked() Info {
	rec := s.rec
	rec.Metadata = cloneMap(s.rec.Metadata)
	return Info{Sandbox: rec, Address: s.addr}
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// New starts an orchestrator: it reconciles what the runtime holds with the
// store, then starts the pools, the timeout reaper and the metrics sampler.
func New(ctx context.Context, opts Options) (*Orchestrator, error) {
	if opts.Runtime == nil || opts.Store == nil || opts.Templates == nil || opts.Network == nil {
		return nil, errors.New("orchestrator: Runtime, Store, Templates and Network are required")
	}
	if opts.MaxTimeout <= 0 {
		opts.MaxTimeout = 24 * time.Hour
	}
	if opts.MetricsInterval <= 0 {
		opts.MetricsInterval = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.OnEvict == nil {
		opts.OnEvict = func(string) {}
	}
	bg, cancel := context.WithCancel(context.Background())
	o := &Orchestrator{
		opts:      opts,
		log:       opts.Logger,
		envd:      newEnvdClient(),
		ctx:       bg,
		cancel:    cancel,
		sandboxes: map[string]*Sandbox{},
		pools:     map[string]*pool{},
	}
	if err := o.reconcile(ctx); err != nil {
		cancel()
		return nil, err
	}
	for _, t := range opts.PoolTemplates {
		if _, err := o.poolFor(t); err != nil {
			o.log.Warn("no pool for template", "template", t, "err", err)
		}
	}
	o.every(reapPeriod, o.reap)
	o.every(opts.MetricsInterval, o.sampleAll)
	o.every(probeInterval, o.newProber())
	return o, nil
}

// Close stops background work and destroys pooled (never handed out)
// sandboxes. Sandboxes that were handed out keep running: a restarted
// server finds them again.
func (o *Orchestrator) Close(ctx context.Context) error {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return nil
	}
	o.closed = true
	pools := make([]*pool, 0, len(o.pools))
	for _, p := range o.pools {
		pools = append(pools, p)
	}
	o.mu.Unlock()
	o.cancel()
	o.wg.Wait()
	var errs []error
	for _, p := range pools {
		errs = append(errs, p.drain(ctx))
	}
	return errors.Join(errs...)
}

// reconcile makes memory, store, runtime and network agree after a start:
// records whose sandbox is still alive are adopted (and watched, like the
// ones this run starts, and their egress policy restored), records whose
// sandbox is gone are dropped, runtime sandboxes with no record (pool
// slots of an earlier run, or half-created ones) are destroyed, and so
// are network devices that belong to no adopted sandbox (a crash between
// claiming them and the runtime's create, or in a destroy).
func (o *Orchestrator) reconcile(ctx context.Context) error {
	recs, err := o.opts.Store.ListSandboxes(ctx)
	if err != nil {
		return fmt.Errorf("orchestrator: reconcile: %w", err)
	}
	live, err := o.opts.Runtime.List(ctx)
	if err != nil {
		return fmt.Errorf("orchestrator: reconcile: list %s sandboxes: %w", o.opts.Runtime.Name(), err)
	}
	alive := map[string]runtime.Sandbox{}
	for _, s := range live {
		alive[s.ID] = s
	}
	for _, rec := range recs {
		if rec.PausedOnDisk != "" {
			if o.adoptPausedOnDisk(rec) {
				// The runtime holds nothing of it; what it does hold (a
				// crash in the middle of its pause or resume) is
				// destroyed below with the other unclaimed sandboxes.
				continue
			}
		}
		rs, ok := alive[rec.ID]
		delete(alive, rec.ID)
		if !ok || rs.State == runtime.StateStopped {
			// It died while no server watched it.
			reason := runtime.ExitExited
			if ok {
				wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				if ex, err := o.opts.Runtime.Wait(wctx, rec.ID); err == nil {
					reason = ex.Reason
				}
				cancel()
			}
			o.log.Info("dropping record of a sandbox that is gone", "sandbox", rec.ID, "reason", reason)
			if _, err := o.opts.Store.AddEvent(ctx, store.Event{SandboxID: rec.ID, TemplateID: rec.TemplateID,
				Owner: rec.Owner, Type: store.EventDied, Reason: reason}); err != nil {
				o.log.Error("recording sandbox event", "sandbox", rec.ID, "err", err)
			}
			if err := o.destroy(ctx, rec.ID); err != nil {
				o.log.Warn("cleaning up stopped sandbox", "sandbox", rec.ID, "err", err)
			}
			if err := o.opts.Store.DeleteSandbox(ctx, rec.ID); err != nil {
				return err
			}
			continue
		}
		// The runtime's view of paused/running wins: it is what is true.
		if rs.State == runtime.StatePaused {
			rec.State = StatePaused
		} else {
			rec.State = StateRunning
		}
		att, attached := o.opts.Network.Lookup(rec.ID)
		if !attached {
			o.log.Warn("adopted sandbox has no network devices", "sandbox", rec.ID)
		} else if o.opts.Egress != nil {
			// The kernel kept enforcing the policy (pinned); its
			// in-memory half, the resolver for domain rules, needs it
			// back.
			eg := egress.Default
			if rec.Egress != nil {
				eg = *rec.Egress
			}
			if err := o.applyEgress(att, eg); err != nil {
				o.log.Warn("restoring egress policy of adopted sandbox", "sandbox", rec.ID, "err", err)
			}
		}
		addr := rs.Addr
		if !addr.IsValid() {
			addr = att.Addr // the runtime lost its record of it
		}
		sb := &Sandbox{rec: rec, addr: addr, net: att, life: o.watch(rec.ID, nil)}
		o.sandboxes[rec.ID] = sb
		if o.opts.Capacity != nil {
			o.opts.Capacity.Adopt(rec.ID, capacity.Resources{CPUs: rec.CPUCount, MemoryMB: rec.MemoryMB, DiskMB: rec.DiskSizeMB})
		}
		o.log.Info("adopted sandbox", "sandbox", rec.ID, "state", rec.State, "endAt", rec.EndAt)
	}
	for id := range alive {
		o.log.Info("destroying unclaimed sandbox", "sandbox", id)
		if err := o.destroy(ctx, id); err != nil {
			o.log.Warn("destroying unclaimed sandbox", "sandbox", id, "err", err)
		}
	}
	for _, a := range o.opts.Network.List() {
		if sb, adopted := o.sandboxes[a.ID]; adopted && sb.rec.PausedOnDisk == "" {
			continue
		}
		o.log.Info("releasing unclaimed network devices", "sandbox", a.ID, "link", a.HostLink)
		if err := o.opts.Network.Teardown(ctx, a.ID); err != nil {
			o.log.Warn("releasing unclaimed network devices", "sandbox", a.ID, "err", err)
		}
	}
	o.sweepSnapshots(ctx)
	return nil
}

// NewID returns a fresh sandbox ID: 20 characters of [a-z0-9], never '-'
// because proxy hosts are split on '-'.
func NewID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	for i := range b {
		// 256 % 36 = 4: the first four letters are a hair more likely; an ID
		// is a name, not a secret, so the bias does not matter.
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

func newToken() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return hex.EncodeToString(b)
}

// CreateRequest is a validated request for a new sandbox.
type CreateRequest struct {
	Template  string
	Timeout   time.Duration
	AutoPause bool
	// AutoPauseFilesOnly makes AutoPause keep only the sandbox's files.
	AutoPauseFilesOnly bool
	AutoResume         bool
	AllowInternet      bool
	Network            []byte // the request's network object, kept as sent
	// Egress, when set, replaces the default egress policy before the
	// sandbox is handed out.
	Egress *egress.Policy
	// PublicTraffic false makes non-envd ports demand the traffic token.
	PublicTraffic bool
	Metadata      map[string]string
	EnvVars       map[string]string
	APIKeyID      string
	// Owner is who may see and use the sandbox (see store.Sandbox.Owner).
	Owner string
	// Volumes are mounted into the sandbox (volumes.go).
	Volumes []VolumeMount
}

// Create makes a sandbox ready to serve: from the template's pool when one is
// ready, else started cold.
func (o *Orchestrator) Create(ctx context.Context, req CreateRequest) (Info, error) {
	if req.Timeout <= 0 || req.Timeout > o.opts.MaxTimeout {
		return Info{}, fmt.Errorf("%w: timeout must be between 1 and %d seconds", ErrInvalid, int(o.opts.MaxTimeout/time.Second))
	}
	if err := o.checkCheckpointMetadata(req.Metadata); err != nil { // checkpoint.go
		return Info{}, err
	}
	p, err := o.poolFor(req.Template)
	if errors.Is(err, ErrTemplateNotFound) {
		// A templateID may name one of the owner's snapshots.
		if sn, ok := o.findSnapshot(ctx, req.Owner, req.Template); ok {
			return o.createFromSnapshot(ctx, req, sn)
		}
	}
	if err != nil {
		return Info{}, err
	}
	if p.tmpl.Owner != "" && p.tmpl.Owner != req.Owner && !p.tmpl.Public {
		return Info{}, fmt.Errorf("%w: %q", ErrTemplateNotFound, req.Template)
	}
	now := time.Now().UTC()
	token := newToken()
	// A pooled slot can have died while it waited; one that fails its
	// initialisation is destroyed and a cold one takes its place.
	var slot slot
	// Where a create's time goes, for the log line below.
	var tTaken, tEgress time.Time
	for attempt := 0; ; attempt++ {
		slot, err = p.takeFor(ctx, req)
		if err != nil {
			return Info{}, err
		}
		tTaken = time.Now()
		if req.Egress != nil {
			if err := o.applyEgress(slot.net, *req.Egress); err != nil {
				o.destroyAsync(slot.ID)
				return Info{}, err
			}
		}
		tEgress = time.Now()
		err = o.initEnvd(ctx, slot, initFor(p.tmpl, req.EnvVars, slot.ID, p.tmpl.ID, token))
		if err == nil {
			break
		}
		o.destroyAsync(slot.ID)
		if !slot.pooled || attempt >= maxPooledTries || ctx.Err() != nil {
			return Info{}, fmt.Errorf("orchestrator: initialise envd of %s: %w", slot.ID, err)
		}
		o.log.Warn("pooled sandbox failed to initialise; taking another", "sandbox", slot.ID, "err", err)
	}
	return o.handOut(ctx, req, slot, p.tmpl, token, now, "pooled", slot.pooled,
		"takeMs", ms(tTaken.Sub(now)), "egressMs", ms(tEgress.Sub(tTaken)))
}

// ms is d in milliseconds, for log lines.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// handOut records a started, initialised slot as req's sandbox, made from
// tmpl, and makes it visible. logArgs are added to the log line of the
// create that began at began.
func (o *Orchestrator) handOut(ctx context.Context, req CreateRequest, slot slot, tmpl Template, token string, began time.Time, logArgs ...any) (Info, error) {
	// The timeout runs from the moment the sandbox is ready to hand out,
	// not from the request: a slow cold create must not eat into it.
	handedOut := time.Now().UTC()
	rec := store.Sandbox{
		ID:                 slot.ID,
		TemplateID:         tmpl.ID,
		Alias:              tmpl.Alias,
		BaseTemplate:       tmpl.base,
		State:              StateRunning,
		StartedAt:          handedOut,
		EndAt:              handedOut.Add(req.Timeout),
		TimeoutSeconds:     int(req.Timeout / time.Second),
		CPUCount:           tmpl.CPUCount,
		MemoryMB:           tmpl.MemoryMB,
		DiskSizeMB:         tmpl.DiskSizeMB,
		Metadata:           cloneMap(req.Metadata),
		EnvdAccessToken:    token,
		AutoPause:          req.AutoPause,
		AutoResume:         req.AutoResume,
		AllowInternet:      req.AllowInternet,
		Network:            req.Network,
		Egress:             req.Egress,
		Addr:               slot.Addr.String(),
		Runtime:            o.opts.Runtime.Name(),
		APIKeyID:           req.APIKeyID,
		Owner:              req.Owner,
		EnvVars:            cloneMap(req.EnvVars),
		AutoPauseFilesOnly: req.AutoPauseFilesOnly,
		Volumes:            recordVolumes(req.Volumes),
	}
	if !req.PublicTraffic {
		rec.TrafficToken = newToken()
	}
	// The record must be durable before the sandbox is announced: a crash
	// after this point leaves a sandbox the next start adopts, not a leak.
	tInit := time.Now()
	if err := o.opts.Store.PutSandbox(ctx, rec); err != nil {
		o.destroyAsync(slot.ID)
		return Info{}, err
	}
	sb := &Sandbox{rec: rec, addr: slot.Addr, net: slot.net, life: slot.life}
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return Info{}, ErrClosed
	}
	o.sandboxes[rec.ID] = sb
	o.mu.Unlock()
	// A sandbox that died while it was being handed out: its watch found
	// no Sandbox to end, so it is ended here (see died).
	if slot.life.isDead() {
		o.endDead(sb, slot.life.exit.Reason, slot.life.exit.Detail)
		return Info{}, fmt.Errorf("orchestrator: sandbox %s died as it started (%s)", rec.ID, slot.life.exit.Reason)
	}
	o.log.Info("sandbox created", append([]any{"sandbox", rec.ID, "template", rec.TemplateID,
		"ms", ms(time.Since(began)), "storeMs", ms(time.Since(tInit))}, logArgs...)...)
	return sb.Info(), nil
}

// maxPooledTries bounds how many pooled slots one Create tries after the
// first fails to initialise; a cold start comes once the pool is empty.
const maxPooledTries = 3

// pooledInitTimeout bounds envd's /init in a pooled slot, which answers in
// milliseconds when it is alive: a slot that died in ways its watch has
// not seen yet must not hold the create for long.
const pooledInitTimeout = 2 * time.Second

// initEnvd initialises a slot's envd for its user.
func (o *Orchestrator) initEnvd(ctx context.Context, s slot, req initRequest) error {
	if s.pooled {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, pooledInitTimeout)
		defer cancel()
	}
	return o.envd.init(ctx, s.Addr, "", req)
}

// every runs fn each period, in its own goroutine, until the orchestrator
// closes. A round that overruns its period delays the next one rather
// than overlapping it.
func (o *Orchestrator) every(period time.Duration, fn func()) {
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-o.ctx.Done():
				return
			case <-t.C:
				fn()
			}
		}
	}()
}

// destroyAsync destroys a runtime sandbox and releases its network off
// the request path. What it held is released at once: it is going, and a
// create may have it.
func (o *Orchestrator) destroyAsync(id string) {
	o.release(id)
	o.wg.Add(1)
	o.destroying.Add(1)
	go func() {
		defer o.wg.Done()
		defer o.destroying.Add(-1)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := o.destroy(ctx, id); err != nil {
			o.log.Warn("destroying sandbox", "sandbox", id, "err", err)
		}
	}()
}

// Get returns a live sandbox.
func (o *Orchestrator) Get(id string) (*Sandbox, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	sb, ok := o.sandboxes[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return sb, nil
}

// All returns every live sandbox, in no particular order.
func (o *Orchestrator) All() []*Sandbox {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]*Sandbox, 0, len(o.sandboxes))
	for _, sb := range o.sandboxes {
		out = append(out, sb)
	}
	return out
}
