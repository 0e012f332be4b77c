package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"

	"github.com/cubicle-dev/cubicle/api"
	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
	"github.com/cubicle-dev/cubicle/template"
	"github.com/cubicle-dev/cubicle/template/builder"
	"github.com/cubicle-dev/cubicle/template/oci"
	"github.com/cubicle-dev/cubicle/template/uploads"
)

// buildRunner runs template builds' steps in one-shot gVisor sandboxes,
// each in network devices claimed from the orchestrator's pool (under the
// default egress policy, as a sandbox's).
type buildRunner struct {
	rt   *gvisor.Runtime
	orch *orchestrator.Orchestrator
}

func (b buildRunner) Run(ctx context.Context, root string, cmd builder.Command, out io.Writer) (int, error) {
	id := newRunID()
	att, gatewayDNS, release, err := b.orch.BuildNetwork(ctx, id)
	if err != nil {
		return -1, err
	}
	defer release()
	return b.rt.RunOnce(ctx, gvisor.OnceConfig{ID: id, RootFS: root, Args: cmd.Args, Env: cmd.Env, Cwd: cmd.Cwd,
		User: cmd.User, CPUCount: cmd.CPUCount, MemoryMB: cmd.MemoryMB, Network: att, GatewayDNS: gatewayDNS, Output: out})
}

// newRunID names a build step's sandbox: [a-z0-9], like a sandbox ID, so
// that runsc and the network pool take it.
func newRunID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return "build" + hex.EncodeToString(b)
}

// startBuilds makes the template build service: gVisor runs its steps, so
// it needs runsc and the veth devices of the gVisor backend; elsewhere the
// API answers builds with 501 (nil, nil).
func startBuilds(c serveConfig, k checked, templates templateSource, orch *orchestrator.Orchestrator, log *slog.Logger) (*builder.Manager, *api.Templates, error) {
	if k.backend == isolationMicroVM || k.runsc == "" {
		log.Warn("template builds are off: they run their steps under gVisor, with the gVisor backend")
		return nil, nil, nil
	}
	rt, err := gvisor.New(gvisor.Options{
		Runsc: k.runsc, StateDir: filepath.Join(c.dataDir, "build-sandboxes"), Platform: c.platform,
		CgroupParent: gvisor.DefaultCgroupParent + "-build", Logger: log.With("component", "build-gvisor"),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("template builds: %w", err)
	}
	ups, err := uploads.New(filepath.Join(c.dataDir, "uploads"), uploads.Limits{})
	if err != nil {
		return nil, nil, fmt.Errorf("template builds: %w", err)
	}
	b, err := builder.New(builder.Options{
		Registry: templates.reg, Templates: templates, Uploads: ups,
		Images:       oci.Cache{Dir: filepath.Join(c.cacheDir, "images")},
		ImageOptions: oci.Options{Insecure: c.insecureRegistries},
		Runner:       buildRunner{rt: rt, orch: orch},
		CacheDir:     filepath.Join(c.dataDir, "build-cache"),
		InUse:        func(id string) string { return orch.TemplateInUse(context.Background(), id) },
	})
	if err != nil {
		return nil, nil, err
	}
	m, err := builder.NewManager(b, filepath.Join(c.dataDir, "builds"), log.With("component", "builds"))
	if err != nil {
		return nil, nil, err
	}
	return m, &api.Templates{Registry: templates.reg, Builds: m, Uploads: ups,
		InUse: func(id string) string { return orch.TemplateInUse(context.Background(), id) }}, nil
}

// Base resolves the template a build starts from, as owner sees them.
func (s templateSource) Base(owner, ref string) (template.Template, string, error) {
	t, err := s.reg.Get(ref)
	if err != nil || (t.Owner != "" && t.Owner != owner && !t.Public) {
		return template.Template{}, "", fmt.Errorf("template %q: %w", ref, template.ErrNotFound)
	}
	rootfs := s.reg.RootFS(t)
	if rootfs == "" {
		return template.Template{}, "", fmt.Errorf("template %q has no root filesystem", ref)
	}
	return t, rootfs, nil
}
