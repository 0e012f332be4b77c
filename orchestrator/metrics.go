package orchestrator

import (
	"context"
	"time"

	"github.com/cubicle-dev/cubicle/network/egress"
)

// Metric is one resource sample of a sandbox, as GET /sandboxes/{id}/metrics
// reports it.
type Metric struct {
	Timestamp  time.Time
	CPUCount   int
	CPUUsedPct float64
	MemUsed    uint64
	MemTotal   uint64
	MemCache   uint64
	DiskUsed   uint64
	DiskTotal  uint64
	// Egress is the sandbox's cumulative egress counters at Timestamp,
	// from Options.Egress (zero without one).
	Egress egress.Counters
}

// metricsKeep is how many samples a sandbox keeps: an hour at the default
// five-second interval.
const metricsKeep = 720

// metricsRing holds a sandbox's recent samples; guarded by Sandbox.mu.
type metricsRing struct {
	samples []Metric
	lastCPU time.Duration
	lastAt  time.Time
}

func (r *metricsRing) add(m Metric) {
	if len(r.samples) == metricsKeep {
		copy(r.samples, r.samples[1:])
		r.samples = r.samples[:metricsKeep-1]
	}
	r.samples = append(r.samples, m)
}

// sample takes one reading of a running sandbox. The runtime's host-side
// figures (cgroup CPU time and memory, writable-layer size) are the source;
// envd's own view is the fallback when the runtime cannot say. Egress
// counters come from the enforcer, whichever source gave the rest.
func (o *Orchestrator) sample(ctx context.Context, sb *Sandbox) {
	sb.mu.Lock()
	if sb.gone || sb.rec.State != StateRunning {
		sb.mu.Unlock()
		return
	}
	id, addr, token, cpus := sb.rec.ID, sb.addr, sb.rec.EnvdAccessToken, sb.rec.CPUCount
	started, att := sb.rec.StartedAt, sb.net
	sb.mu.Unlock()

	now := time.Now().UTC()
	m := Metric{Timestamp: now, CPUCount: cpus}
	if o.opts.Egress != nil && att.ID != "" {
		c, err := o.opts.Egress.Counters(att)
		if err != nil {
			o.log.Debug("sampling egress counters", "sandbox", id, "err", err)
		}
		m.Egress = c
	}
	st, err := o.opts.Runtime.Stats(ctx, id)
	if err != nil {
		em, eerr := o.envd.metrics(ctx, addr, token)
		if eerr != nil {
			o.log.Debug("sampling sandbox", "sandbox", id, "runtimeErr", err, "envdErr", eerr)
			return
		}
		m.CPUUsedPct, m.MemUsed, m.MemTotal, m.MemCache = em.CPUUsedPct, em.MemUsed, em.MemTotal, em.MemCache
		m.DiskUsed, m.DiskTotal = em.DiskUsed, em.DiskTotal
		sb.mu.Lock()
		sb.metrics.add(m)
		sb.mu.Unlock()
		return
	}
	m.MemUsed, m.MemTotal, m.MemCache = st.MemUsed, st.MemLimit, st.MemCache
	m.DiskUsed, m.DiskTotal = st.DiskUsed, st.DiskTotal

	sb.mu.Lock()
	defer sb.mu.Unlock()
	prevCPU, prevAt := sb.metrics.lastCPU, sb.metrics.lastAt
	if prevAt.IsZero() {
		prevAt = started
	}
	if wall := now.Sub(prevAt); wall > 0 && cpus > 0 && st.CPUUsage >= prevCPU {
		pct := 100 * float64(st.CPUUsage-prevCPU) / float64(wall) / float64(cpus)
		m.CPUUsedPct = min(pct, 100)
	}
	sb.metrics.lastCPU, sb.metrics.lastAt = st.CPUUsage, now
	sb.metrics.add(m)
}

// Metrics returns the samples of a sandbox taken in [start, end] (zero
// times mean unbounded). A fresh reading is taken first when the newest is
// older than a second, so a caller never sees stale figures only.
func (o *Orchestrator) Metrics(ctx context.Context, id string, start, end time.Time) ([]Metric, error) {
	sb, err := o.Get(id)
	if err != nil {
		return nil, err
	}
	sb.mu.Lock()
	n := len(sb.metrics.samples)
	stale := n == 0 || time.Since(sb.metrics.samples[n-1].Timestamp) > time.Second
	sb.mu.Unlock()
	if stale {
		o.sample(ctx, sb)
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	out := []Metric{}
	for _, m := range sb.metrics.samples {
		ts := m.Timestamp.Truncate(time.Second)
		if (!start.IsZero() && ts.Before(start)) || (!end.IsZero() && ts.After(end)) {
			continue
		}
		out = append(out, m)
	}
	return out, nil
}

// sampleAll takes one metrics sample of every sandbox.
func (o *Orchestrator) sampleAll() {
	for _, sb := range o.All() {
		ctx, cancel := context.WithTimeout(o.ctx, 5*time.Second)
		o.sample(ctx, sb)
		cancel()
	}
}
