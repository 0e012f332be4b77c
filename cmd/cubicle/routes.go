package main

import (
	"context"
	"net/netip"
	"time"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/proxy"
)

// routes answers the proxy's questions from the orchestrator.
type routes struct {
	orch *orchestrator.Orchestrator
}

func routeOf(in orchestrator.Info) proxy.Route {
	return proxy.Route{
		Addr:         in.Address,
		Paused:       in.State == orchestrator.StatePaused,
		TrafficToken: in.TrafficToken,
		AccessToken:  in.EnvdAccessToken,
		Checkpoint:   in.CheckpointsPerCommand(),
	}
}

func (r *routes) Route(id string) (proxy.Route, bool) {
	if r.orch == nil {
		return proxy.Route{}, false
	}
	sb, err := r.orch.Get(id)
	if err != nil {
		return proxy.Route{}, false
	}
	rt := routeOf(sb.Info())
	// A sandbox paused to disk has no address until Wake resumes it.
	return rt, rt.Addr != (netip.Addr{}) || rt.Paused
}

func (r *routes) Wake(ctx context.Context, id string) bool {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return r.orch.ResumeForTraffic(ctx, id)
}

func (r *routes) Each(fn func(id string, rt proxy.Route) bool) {
	for _, sb := range r.orch.All() {
		in := sb.Info()
		if !fn(in.ID, routeOf(in)) {
			return
		}
	}
}

func (r *routes) Checkpoint(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	_, err := r.orch.CheckpointCommand(ctx, id)
	return err
}
