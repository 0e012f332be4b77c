package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
)

// slot is a started sandbox whose envd answers but has not been initialised
// for any user: the unit a pool holds.
type slot struct {
	ID     string
	Addr   netip.Addr
	net    network.Attachment
	pooled bool
	// life is the watch on the slot's sandbox, started with it.
	life *life
}

// pool keeps up to size slots of one template ready. A slot is handed out by
// a channel receive, so no slot can ever go to two callers. A slot whose
// sandbox died while it waited is never handed out: whoever receives it
// (take, or the filler's sweep when the watch reports the death) destroys
// it instead.
type pool struct {
	o     *Orchestrator
	tmpl  Template
	size  int
	ready chan slot
	kick  chan struct{} // wakes the filler; capacity 1, never blocks a sender
}

// poolFor returns the pool of a template, making it (and starting its
// filler) on first use.
func (o *Orchestrator) poolFor(idOrAlias string) (*pool, error) {
	t, err := o.opts.Templates.Lookup(idOrAlias)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %v", ErrTemplateNotFound, idOrAlias, err)
	}
	if t.Owner != "" {
		// A template built through the API can be built again: a pool
		// would hand out sandboxes of its old build, on files the new
		// one replaced. Its sandboxes start cold, from what it is now.
		return &pool{o: o, tmpl: t, ready: make(chan slot), kick: make(chan struct{}, 1)}, nil
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil, ErrClosed
	}
	if p, ok := o.pools[t.ID]; ok {
		return p, nil
	}
	p := &pool{
		o:     o,
		tmpl:  t,
		size:  o.opts.PoolSize,
		ready: make(chan slot, max(o.opts.PoolSize, 0)),
		kick:  make(chan struct{}, 1),
	}
	o.pools[t.ID] = p
	if p.size > 0 {
		o.wg.Add(1)
		go p.fill()
	}
	return p, nil
}

// take hands out a ready slot that is alive, or starts one cold when none
// is ready.
func (p *pool) take(ctx context.Context) (slot, error) {
	defer p.wake()
	for {
		select {
		case s := <-p.ready:
			if s.life.isDead() {
				p.drop(s)
				continue
			}
			return s, nil
		default:
		}
		return p.start(ctx, false)
	}
}

// drop destroys a dead slot that the caller received from ready.
func (p *pool) drop(s slot) {
	p.o.log.Warn("pooled sandbox died; dropping it", "sandbox", s.ID, "template", p.tmpl.ID, "reason", s.life.exit.Reason)
	p.o.destroyAsync(s.ID)
}

// sweep drops the dead slots from ready. Live ones go back; there is room
// for them, as nothing else adds to ready more slots than it has room for.
func (p *pool) sweep() {
	for range len(p.ready) {
		var s slot
		select {
		case s = <-p.ready:
		default:
			return
		}
		if s.life.isDead() {
			p.drop(s)
			continue
		}
		select {
		case p.ready <- s:
		default:
			p.o.destroyAsync(s.ID) // cannot happen; never leak a sandbox
		}
	}
}

func (p *pool) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// fillParallel is how many pool sandboxes start at once: enough to refill
// a drained pool quickly, few enough not to starve running sandboxes of CPU.
const fillParallel = 2

// fullRetry is how often a pool that the host has no room for tries again.
const fullRetry = time.Second

// fill keeps the pool full until the orchestrator closes. Failures back off
// exponentially so that a broken template does not spin the CPU.
func (p *pool) fill() {
	defer p.o.wg.Done()
	backoff := 100 * time.Millisecond
	done := make(chan error, fillParallel)
	running := 0
	for {
		// ready has room for size slots and at most size-len(ready) starts
		// are in flight, so the sends below never block.
		for running < fillParallel && len(p.ready)+running < p.size && p.o.ctx.Err() == nil {
			running++
			p.o.wg.Add(1)
			p.o.filling.Add(1)
			go func() {
				defer p.o.wg.Done()
				s, err := p.start(p.o.ctx, true)
				if err == nil {
					select {
					case p.ready <- s:
					default:
						p.o.destroyAsync(s.ID) // cannot happen; never leak a sandbox
					}
				}
				p.o.filling.Add(-1) // once the slot can be taken or reclaimed
				done <- err
			}()
		}
		select {
		case <-p.o.ctx.Done():
			return
		case <-p.kick:
			p.sweep()
		case err := <-done:
			running--
			if err == nil {
				backoff = 100 * time.Millisecond
				continue
			}
			if p.o.ctx.Err() != nil {
				return
			}
			if errors.Is(err, ErrHostFull) {
				// Not a failure: pools yield to user sandboxes (admission.go).
				p.o.log.Debug("pool waits: the host is full", "template", p.tmpl.ID, "err", err)
				select {
				case <-p.o.ctx.Done():
					return
				case <-time.After(fullRetry):
				}
				continue
			}
			p.o.log.Error("filling sandbox pool", "template", p.tmpl.ID, "err", err, "retryIn", backoff)
			select {
			case <-p.o.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 30*time.Second)
		}
	}
}

// start claims network devices, creates a sandbox in them and waits until
// its envd answers.
func (p *pool) start(ctx context.Context, pooled bool) (slot, error) {
	return p.startWith(ctx, pooled, nil)
}

// startWith is start for a sandbox with volumes (volumes.go).
func (p *pool) startWith(ctx context.Context, pooled bool, vols []runtime.VolumeMount) (slot, error) {
	id := NewID()
	if err := p.o.admit(ctx, id, p.tmpl, pooled); err != nil {
		return slot{}, err
	}
	att, err := p.o.claimNetwork(ctx, id)
	if err != nil {
		p.o.release(id)
		return slot{}, err
	}
	rs, err := p.o.opts.Runtime.Create(ctx, runtime.Config{
		ID:         id,
		TemplateID: p.tmpl.ID,
		RootFS:     p.tmpl.RootFS,
		CPUCount:   p.tmpl.CPUCount,
		MemoryMB:   p.tmpl.MemoryMB,
		DiskSizeMB: p.tmpl.DiskSizeMB,
		Envd:       p.o.opts.Envd,
		EnvdArgs:   p.o.opts.EnvdArgs,
		Network:    att,
		GatewayDNS: p.o.opts.Egress != nil,
		Volumes:    vols,
	})
	if err != nil {
		// The runtime removed what it made; the network is ours.
		p.o.releaseNetwork(ctx, id)
		p.o.release(id)
		return slot{}, fmt.Errorf("orchestrator: start %s sandbox: %w", p.tmpl.ID, noSpace(err, p.tmpl))
	}
	l := p.o.watch(id, p)
	p.o.settle(id)
	if err := p.prepare(ctx, rs.Addr); err != nil {
		p.o.destroyAsync(id)
		return slot{}, fmt.Errorf("orchestrator: new sandbox %s: %w", id, err)
	}
	return slot{ID: id, Addr: rs.Addr, net: att, pooled: pooled, life: l}, nil
}

// prepare waits for envd and brings up the template's start command, so
// that a handed-out sandbox serves at once (a warm kernel, a running app).
func (p *pool) prepare(ctx context.Context, addr netip.Addr) error {
	if err := p.o.envd.waitHealthy(ctx, addr, 30*time.Second); err != nil {
		return fmt.Errorf("envd: %w", err)
	}
	return p.o.startTemplate(ctx, addr, p.tmpl)
}

// startTemplate warms up a freshly booted sandbox of t and runs t's start
// command until its ready command succeeds.
func (o *Orchestrator) startTemplate(ctx context.Context, addr netip.Addr, t Template) error {
	// The first process a fresh sandbox runs pays for loading bash and the
	// login profile through the runtime's file system (about 30 ms under
	// gVisor); the SDK's first commands.run would pay it on the request
	// path. A template without bash only loses the warm-up.
	if code, err := o.envd.runCommand(ctx, addr, "true"); err != nil || code != 0 {
		o.log.Debug("warm-up command failed", "template", t.ID, "exit", code, "err", err)
	}
	if t.StartCmd == "" {
		return nil
	}
	if err := o.envd.startCommand(ctx, addr, t.StartCmd); err != nil {
		return err
	}
	if t.ReadyCmd == "" {
		return nil
	}
	return o.envd.waitReady(ctx, addr, t.ReadyCmd, 2*time.Minute)
}

// drain destroys every slot still waiting in the pool.
func (p *pool) drain(ctx context.Context) error {
	var errs []error
	for {
		select {
		case s := <-p.ready:
			p.o.release(s.ID)
			if err := p.o.destroy(ctx, s.ID); err != nil {
				errs = append(errs, err)
			}
		default:
			return errors.Join(errs...)
		}
	}
}
