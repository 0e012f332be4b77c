//go:build linux && amd64

package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"
)

// IdleNice is the niceness of pooled processes while they warm up and
// wait (the weakest: nice 19, setpriority(2)).
const IdleNice = 19

// ErrPoolClosed is returned by Get on a closed pool.
var ErrPoolClosed = errors.New("control: pool closed")

// PoolConfig configures a Pool.
type PoolConfig struct {
	// Size is how many idle processes the pool keeps ready.
	Size int
	// Spawn describes each process. If Spawn.Jail is set, its Root is a
	// base directory: each process is jailed in Root/<n>, and its Cgroup
	// (if set) gets "-<n>" appended.
	Spawn SpawnConfig
	// Snapshot is the template every process prepares, with paths as the
	// VMM process sees them (inside its jail).
	Snapshot Snapshot
	// PrepareTimeout bounds one process's start and prepare (0: 30 s).
	PrepareTimeout time.Duration
	// RefillConcurrency bounds how many processes start and prepare at
	// once (0: 2), so that a burst of Gets is not followed by a burst of
	// exec, runtime starts and VM builds competing with the restores.
	RefillConcurrency int
	Logger            *slog.Logger
}

// Pool keeps Size idle VMM processes, each holding a VM prepared for the
// template (memory file mapped, KVM VM, memory slot, irqchip, PIT and
// vCPUs created). Get hands one out and a replacement starts in the
// background, so a create pays only for the restore itself. Processes
// warm up at IdleNice and are handed out at niceness 0: on a busy host,
// starting replacements (exec, runtime start, cgroup moves, prepare)
// takes only the CPU that restores leave.
//
// Concurrency: ready is a buffered channel of prepared processes; fill
// goroutines (at most Size running) push into it; mu guards closed and
// the counter used to name jails.
type Pool struct {
	cfg   PoolConfig
	log   *slog.Logger
	ready chan *Process
	sem   chan struct{} // bounds the processes warming up at once
	ctx   context.Context
	stop  context.CancelFunc
	wg    sync.WaitGroup

	mu     sync.Mutex
	closed bool
	next   int
	errs   int // consecutive failed fills, for backoff
}

// NewPool starts filling a pool.
func NewPool(cfg PoolConfig) (*Pool, error) {
	if cfg.Size < 1 {
		return nil, fmt.Errorf("%w: pool size %d", ErrBadRequest, cfg.Size)
	}
	if cfg.PrepareTimeout == 0 {
		cfg.PrepareTimeout = DefaultTimeout
	}
	if cfg.RefillConcurrency == 0 {
		cfg.RefillConcurrency = 2
	}
	p := &Pool{cfg: cfg, log: cfg.Logger, ready: make(chan *Process, cfg.Size), sem: make(chan struct{}, cfg.RefillConcurrency)}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.ctx, p.stop = context.WithCancel(context.Background())
	for range cfg.Size {
		p.refill()
	}
	return p, nil
}

// refill starts one fill goroutine unless the pool is closed.
func (p *Pool) refill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	n := p.next
	p.next++
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.fill(n)
	}()
}

// fill spawns and prepares process n, retrying with backoff on failure
// until the pool closes.
func (p *Pool) fill(n int) {
	for {
		select { // at most RefillConcurrency processes warm up at once
		case p.sem <- struct{}{}:
		case <-p.ctx.Done():
			return
		}
		proc, err := p.spawn(n)
		<-p.sem
		if err == nil {
			p.mu.Lock()
			p.errs = 0
			p.mu.Unlock()
			select {
			case p.ready <- proc:
			case <-p.ctx.Done():
				proc.Kill()
			}
			return
		}
		p.mu.Lock()
		p.errs++
		backoff := time.Duration(min(p.errs, 10)) * 100 * time.Millisecond
		p.mu.Unlock()
		p.log.Warn("vmm pool: preparing a process failed", "err", err, "retry_in", backoff)
		select {
		case <-time.After(backoff):
		case <-p.ctx.Done():
			return
		}
	}
}

func (p *Pool) spawn(n int) (*Process, error) {
	sc := p.cfg.Spawn
	if sc.Jail != nil {
		j := *sc.Jail
		j.Root = filepath.Join(j.Root, fmt.Sprint(n))
		if j.Cgroup != "" {
			j.Cgroup = fmt.Sprintf("%s-%d", j.Cgroup, n)
		}
		sc.Jail = &j
	}
	proc, err := Spawn(sc)
	if err != nil {
		return nil, err
	}
	// Warm up in the background: a restore running meanwhile gets the
	// CPU first. (A thread the runtime starts before this call keeps
	// niceness 0; that only costs a little of the effect.)
	if err := proc.SetNice(IdleNice); err != nil {
		p.log.Debug("vmm pool: lowering priority", "err", err)
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.PrepareTimeout)
	defer cancel()
	if err := proc.Prepare(ctx, p.cfg.Snapshot); err != nil {
		proc.Kill()
		return nil, err
	}
	return proc, nil
}

// Get returns a prepared process (waiting for one if none is ready) and
// starts preparing its replacement. The caller owns the process.
func (p *Pool) Get(ctx context.Context) (*Process, error) {
	for {
		select {
		case proc := <-p.ready:
			p.refill()
			select {
			case <-proc.Done(): // died while idle: take the next
				proc.Kill()
				continue
			default:
			}
			if err := proc.SetNice(0); err != nil {
				p.log.Warn("vmm pool: restoring priority", "err", err)
			}
			return proc, nil
		case <-p.ctx.Done():
			return nil, ErrPoolClosed
		case <-ctx.Done():
			return nil, fmt.Errorf("control: pool: %w", ctx.Err())
		}
	}
}

// Ready returns how many prepared processes wait.
func (p *Pool) Ready() int { return len(p.ready) }

// Close stops refilling and kills the idle processes.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	p.stop()
	p.wg.Wait()
	var errs []error
	for {
		select {
		case proc := <-p.ready:
			errs = append(errs, proc.Kill())
		default:
			return errors.Join(errs...)
		}
	}
}
