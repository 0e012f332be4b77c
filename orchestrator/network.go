package orchestrator

import (
	"context"
	"errors"
	"fmt"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/egress"
)

// The network path. Every sandbox's devices are claimed here from
// Options.Network before its runtime sandbox exists, handed to the
// runtime in runtime.Config.Network, switched to the sandbox's egress
// policy here (Options.Egress), read here for counters, and released here
// after the runtime destroyed the sandbox: by destroy, whatever ends it
// (a kill, a death, a failed create, a pool drain, a reconciliation). The
// egress half of each device (eBPF program, resolver) lives as long as
// the device: the pool prepares it once as it makes the device and
// releases it once before it removes it (egress.Enforcer.PoolOptions).
// No runtime touches either, so every backend is confined the same way.

// Egress is what the orchestrator needs of an egress enforcer
// (*egress.Enforcer).
type Egress interface {
	// Apply puts a's devices under p from the next packet and query on;
	// it also gives devices adopted after a restart their resolver back.
	Apply(a network.Attachment, p egress.Policy) error
	// Counters are what a's sandbox sent, passed and dropped.
	Counters(a network.Attachment) (egress.Counters, error)
}

// ErrNoPolicy is returned for a policy asked of an orchestrator that has
// no Options.Egress.
var ErrNoPolicy = errors.New("orchestrator: no egress policy enforcer")

// claimNetwork gives sandbox id its devices, under the default policy.
func (o *Orchestrator) claimNetwork(ctx context.Context, id string) (network.Attachment, error) {
	a, err := o.opts.Network.Setup(ctx, id)
	if err != nil {
		return network.Attachment{}, fmt.Errorf("orchestrator: network of %s: %w", id, err)
	}
	return a, nil
}

// applyEgress puts a under p.
func (o *Orchestrator) applyEgress(a network.Attachment, p egress.Policy) error {
	if o.opts.Egress == nil {
		return ErrNoPolicy
	}
	if err := o.opts.Egress.Apply(a, p); err != nil {
		return fmt.Errorf("orchestrator: egress policy of %s: %w", a.ID, err)
	}
	return nil
}

// destroy is the one way a runtime sandbox goes: the runtime destroys it,
// then its devices are released (with their egress policy). The devices
// go even when the runtime failed: a sandbox whose veth is gone has no
// way out, and the runtime's half is retried by the next reconciliation,
// which finds it in the runtime's List. Both halves tolerate being done
// already.
func (o *Orchestrator) destroy(ctx context.Context, id string) error {
	var errs []error
	if err := o.opts.Runtime.Kill(ctx, id); err != nil {
		errs = append(errs, err)
	}
	if err := o.opts.Network.Teardown(context.WithoutCancel(ctx), id); err != nil {
		errs = append(errs, fmt.Errorf("orchestrator: network of %s: %w", id, err))
	}
	return errors.Join(errs...)
}

// releaseNetwork releases the devices of a sandbox the runtime never made
// (its create failed; the runtime removed what it had made).
func (o *Orchestrator) releaseNetwork(ctx context.Context, id string) {
	if err := o.opts.Network.Teardown(context.WithoutCancel(ctx), id); err != nil {
		o.log.Error("releasing the network of a failed create", "sandbox", id, "err", err)
	}
}

// BuildNetwork claims devices for a template build's step (id names it
// like a sandbox): under the default egress policy, as every device is
// made, with cubicle's resolver on the gateway when an enforcer runs.
// release gives them back.
func (o *Orchestrator) BuildNetwork(ctx context.Context, id string) (a network.Attachment, gatewayDNS bool, release func(), err error) {
	a, err = o.claimNetwork(ctx, id)
	if err != nil {
		return a, false, nil, err
	}
	return a, o.opts.Egress != nil, func() { o.releaseNetwork(context.WithoutCancel(ctx), id) }, nil
}
