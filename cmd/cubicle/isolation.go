package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
	"github.com/cubicle-dev/cubicle/runtime/microvm"
	"github.com/cubicle-dev/cubicle/template"
	"github.com/cubicle-dev/cubicle/vmm/linux"
)

// The values of serve's --isolation.
const (
	isolationAuto    = "auto"
	isolationMicroVM = microvm.Name
	isolationGVisor  = gvisor.Name
)

// chooseIsolation turns --isolation into the backend serve runs, and why.
// auto is gVisor for now, even where this host's /dev/kvm can boot a
// Linux guest (hardware virtualization, not PVM): the microVM backend has
// passed its own suite in nested KVM but not yet the E2B end-to-end suite
// (docs/STATUS.md), so it is chosen explicitly with --isolation microvm
// until then; the reason says when it could be. An explicit microvm on a
// host that cannot boot Linux, or cannot jail the VMMs (serve always
// jails them: vmm/jailer), is an error. canBoot is vmm/linux.CanBoot and
// canJail microvm.CheckJail (parameters for tests).
func chooseIsolation(flag string, canBoot func() (bool, string), canJail func() error) (backend, why string, err error) {
	switch flag {
	case isolationGVisor:
		return isolationGVisor, "--isolation gvisor", nil
	case isolationMicroVM, isolationAuto:
		ok, reason := canBoot()
		if ok {
			if err := canJail(); err != nil {
				ok, reason = false, "the VMMs cannot be jailed: "+err.Error()
			}
		}
		switch {
		case ok && flag == isolationMicroVM:
			return isolationMicroVM, "--isolation microvm", nil
		case ok:
			return isolationGVisor, "auto: gVisor; /dev/kvm has hardware virtualization, so --isolation microvm runs sandboxes as microVMs " +
				"(not yet auto's choice: that backend has not yet passed the E2B end-to-end suite)", nil
		case flag == isolationMicroVM:
			return "", "", fmt.Errorf("--isolation microvm: this host cannot run microVMs: %s", reason)
		default:
			return isolationGVisor, "auto: no microVMs here (" + reason + ")", nil
		}
	}
	return "", "", fmt.Errorf("--isolation %q: want auto, microvm or gvisor", flag)
}

// backendRuntime is what serve needs of either backend.
type backendRuntime interface {
	runtime.Runtime
	StateDir() string
	Close() error
}

// networkMode is the network device kind the backend's sandboxes use.
func networkMode(backend string) network.Mode {
	if backend == isolationMicroVM {
		return network.ModeTap
	}
	return network.ModeVeth
}

// microvmImage returns a template's root filesystem as the ext4 image a
// microVM boots (template.Registry.Image: built once per template and
// cubicle binary, cached beside the template), keyed by its file name,
// which names its inputs.
func microvmImage(ctx context.Context, reg *template.Registry, self string, cfg runtime.Config) (microvm.Image, error) {
	t, err := reg.Get(cfg.TemplateID)
	if err != nil {
		return microvm.Image{}, err
	}
	path, err := reg.Image(ctx, t, self)
	if err != nil {
		return microvm.Image{}, err
	}
	return microvm.Image{Path: path, Key: strings.TrimSuffix(filepath.Base(path), ".ext4")}, nil
}

// newBackend makes the chosen backend's runtime. For microvm the guest
// kernel is built first unless it is cached (minutes, once).
func newBackend(ctx context.Context, backend string, c serveConfig, k checked, reg *template.Registry, net *network.Pool, log *slog.Logger) (backendRuntime, error) {
	if backend != isolationMicroVM {
		return gvisor.New(gvisor.Options{
			Runsc:    k.runsc,
			StateDir: filepath.Join(c.dataDir, "gvisor"),
			Platform: c.platform,
			Logger:   log.With("component", "gvisor"),
		})
	}
	kdir := filepath.Join(c.cacheDir, "linux")
	kernel, ok := linux.Cached(kdir)
	if !ok {
		if c.noBuild {
			return nil, fmt.Errorf("the guest kernel is not built in %s (--no-build)", kdir)
		}
		log.Info("building the guest kernel (first start with microVMs; minutes)", "cache", kdir)
		var err error
		if kernel, err = linux.Build(kdir); err != nil {
			return nil, err
		}
	}
	return microvm.New(microvm.Options{
		StateDir:  filepath.Join(c.dataDir, "microvm"),
		CacheDir:  c.cacheDir,
		Kernel:    kernel,
		KernelKey: linux.Key(),
		Image: func(ctx context.Context, cfg runtime.Config) (microvm.Image, error) {
			return microvmImage(ctx, reg, k.self, cfg)
		},
		Network: net,
		// Every VMM jailed; chooseIsolation refused a host that cannot.
		Jail:   &microvm.Jail{},
		Logger: log.With("component", "microvm"),
	})
}

// checkJail is chooseIsolation's canJail: whether this host can jail the
// microVM backend's VMMs (microvm.CheckJail).
func checkJail() error { return microvm.CheckJail() }
