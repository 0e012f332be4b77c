package orchestrator

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/store"
)

// Dead sandboxes. A sandbox can stop without being asked: its envd exits
// or is killed, the host OOM-kills it, someone kills its processes. Each
// runtime sandbox the orchestrator starts or adopts is watched from its
// start to its end (Runtime.Wait, in one goroutine per sandbox); a running
// one's envd is also probed, for an envd that hangs while its sandbox
// runs. A sandbox found dead is killed as a client's kill would (gone
// from the API, connections reset, everything released) and leaves an
// EventDied with the reason. A pooled slot found dead is dropped from its
// pool before anyone is handed it.

// ReasonUnresponsive is the EventDied reason of a sandbox whose envd
// stopped answering while its processes still ran.
const ReasonUnresponsive = "unresponsive"

// life is what is known of one runtime sandbox's end. It is shared by the
// slot and the Sandbox the runtime sandbox becomes.
type life struct {
	id   string
	pool *pool // the pool that made it; nil for an adopted sandbox
	dead chan struct{}
	// exit is set before dead is closed.
	exit runtime.Exit
}

// isDead reports whether the runtime said the sandbox stopped.
func (l *life) isDead() bool {
	if l == nil {
		return false
	}
	select {
	case <-l.dead:
		return true
	default:
		return false
	}
}

// watchRetry is how long a watch waits before asking the runtime again
// after it failed to answer (runsc busy, a transient error).
const watchRetry = 5 * time.Second

// watch starts watching runtime sandbox id until it stops or the
// orchestrator closes.
func (o *Orchestrator) watch(id string, p *pool) *life {
	l := &life{id: id, pool: p, dead: make(chan struct{})}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		for {
			ex, err := o.opts.Runtime.Wait(o.ctx, id)
			if o.ctx.Err() != nil {
				return // the next start watches it again
			}
			if errors.Is(err, runtime.ErrNotFound) {
				// Destroyed already: killed by this orchestrator.
				ex, err = runtime.Exit{ID: id, Reason: runtime.ExitExited, Detail: "destroyed"}, nil
			}
			if err == nil {
				l.exit = ex
				close(l.dead)
				o.died(l)
				return
			}
			o.log.Warn("watching sandbox", "sandbox", id, "err", err, "retryIn", watchRetry)
			select {
			case <-o.ctx.Done():
				return
			case <-time.After(watchRetry):
			}
		}
	}()
	return l
}

// died acts on the end of l's sandbox. A handed-out sandbox is killed; a
// slot still in its pool is swept out by the pool's filler; one between
// the two (being handed out) is Create's to drop, which checks the watch
// after registering it. A sandbox this orchestrator killed is in none of
// these places any more.
func (o *Orchestrator) died(l *life) {
	o.mu.Lock()
	sb, ok := o.sandboxes[l.id]
	o.mu.Unlock()
	if ok {
		sb.mu.Lock()
		defer sb.mu.Unlock()
		// A sandbox paused to disk or resumed since has another life, or
		// none.
		ok = sb.life == l
	}
	if !ok {
		if l.pool != nil {
			l.pool.wake()
		}
		return
	}
	o.dieLocked(sb, l.exit.Reason, l.exit.Detail)
}

// endDead kills a handed-out sandbox found dead, recording why.
func (o *Orchestrator) endDead(sb *Sandbox, reason, detail string) {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	o.dieLocked(sb, reason, detail)
}

// dieLocked is endDead with sb.mu held.
func (o *Orchestrator) dieLocked(sb *Sandbox, reason, detail string) {
	if sb.gone {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	o.log.Warn("sandbox died", "sandbox", sb.rec.ID, "reason", reason, "detail", detail)
	o.killLocked(ctx, sb, store.EventDied, reason)
}

// Probing envd. A sandbox whose processes run but whose envd does not
// answer /health is as dead to its user as one that exited. Probes are
// generous, as a busy sandbox (a CPU quota spent, a loaded 2-core CI host
// running twenty cold starts) must not be taken for a dead one:
// probeFailures consecutive failures of up to probeTimeout each, rounds
// probeInterval apart, about 20 to 25 s in all. Deaths the kernel tells of
// (exit, OOM) do not wait for this: the runtime's Wait reports them.
// Paused sandboxes are not probed.
const (
	probeInterval = 4 * time.Second
	probeTimeout  = 5 * time.Second
	probeFailures = 4
)

// newProber returns a round of probes: every running sandbox's envd at
// once, the round over when the last answers or times out.
func (o *Orchestrator) newProber() func() {
	// Its own client: probes must not queue behind (or be starved by) the
	// long calls the shared one makes.
	hc := &http.Client{Timeout: probeTimeout, Transport: &http.Transport{DisableKeepAlives: true}}
	return func() {
		var wg sync.WaitGroup
		for _, sb := range o.All() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				o.probe(hc, sb)
			}()
		}
		wg.Wait()
	}
}

// probe asks one running sandbox's envd for /health and ends the sandbox
// after probeFailures failures in a row. A pause or resume meanwhile
// voids the answer: a frozen sandbox does not answer.
func (o *Orchestrator) probe(hc *http.Client, sb *Sandbox) {
	sb.mu.Lock()
	if sb.gone || sb.rec.State != StateRunning {
		sb.mu.Unlock()
		return
	}
	addr, epoch := sb.addr, sb.stateEpoch
	sb.mu.Unlock()

	ctx, cancel := context.WithTimeout(o.ctx, probeTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, envdURL(addr, "/health"), nil)
	resp, err := hc.Do(req)
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode >= 300 {
			err = errors.New("/health answered " + resp.Status)
		}
	}
	if o.ctx.Err() != nil {
		return
	}

	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.gone || sb.rec.State != StateRunning || sb.stateEpoch != epoch {
		return
	}
	if err == nil {
		sb.probeFails = 0
		return
	}
	sb.probeFails++
	o.log.Debug("envd health probe failed", "sandbox", sb.rec.ID, "failures", sb.probeFails, "err", err)
	if sb.probeFails >= probeFailures {
		o.dieLocked(sb, ReasonUnresponsive, err.Error())
	}
}
