package template

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// CodeInterpreterAlias is the alias of the code interpreter template, the
// default template of the @e2b/code-interpreter SDKs. Its ID is generated
// at the first build on a data dir and kept by later ones.
const CodeInterpreterAlias = "code-interpreter-v1"

// The code interpreter's server is the cubicle binary itself, which the
// gVisor runtime mounts at /.cubicle/envd in every sandbox; it serves on
// port 49999 (guest/codeinterp) and answers /health once its default Python
// kernel is up, so the pool hands out sandboxes with a warm kernel.
const (
	CodeInterpreterStartCmd = "/.cubicle/envd codeinterp --port 49999"
	CodeInterpreterReadyCmd = "curl -sf http://127.0.0.1:49999/health"
)

// codeInterpreterMemoryMB is its sandboxes' memory: a kernel with numpy,
// pandas and matplotlib imported takes about 200 MiB, and a DataFrame or a
// figure or two on top of that would not fit the default 512.
const codeInterpreterMemoryMB = 1024

// codeInterpreterRecipeVersion is bumped when what BuildCodeInterpreter
// does changes beyond codeInterpreterPackages and its script.
const codeInterpreterRecipeVersion = 1

// codeInterpreterPackages are Debian's Python data stack (PyPI is out of
// reach): ipykernel for the kernels, and what notebooks import first.
var codeInterpreterPackages = []string{
	"python3-ipykernel",
	"python3-numpy",
	"python3-pandas",
	"python3-matplotlib",
	"python3-scipy",
}

// codeInterpreterScript runs chrooted in a copy of the base rootfs, like
// configureScript, with PACKAGES set.
const codeInterpreterScript = `set -eu
mount -t proc proc /proc
apt-get -q update
# Recommends would add a Tk GUI stack and fonts nobody sees.
apt-get -q -y --no-install-recommends -o Dpkg::Use-Pty=0 install $PACKAGES

# Warm what the first kernel of every sandbox would otherwise make:
# matplotlib's font cache and IPython's profile, in the sandbox user's home.
runuser -u user -- env HOME=/home/user MPLBACKEND=agg python3 -c 'import matplotlib.pyplot, IPython.paths; IPython.paths.get_ipython_dir()'

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
find /usr/share/man /usr/share/info -mindepth 1 ! -type d -delete
rm -rf /var/log/apt/* /var/log/*.log /root/.cache
find /run /tmp -mindepth 1 ! -type d -delete

# Fail the build, not a sandbox, when the kernel cannot run.
python3 -c 'import ipykernel, numpy, pandas, matplotlib, scipy; print("versions: ipykernel", ipykernel.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__, "matplotlib", matplotlib.__version__, "scipy", scipy.__version__)'
umount /proc
`

// codeInterpreterRecipe is every input of the code interpreter rootfs; its
// hash keys the cache.
type codeInterpreterRecipe struct {
	Version  int      `json:"version"`
	Base     string   `json:"base"` // cache key of the base rootfs it extends
	Packages []string `json:"packages"`
	Script   string   `json:"script"`
}

func (r codeInterpreterRecipe) key() string { return recipeKey(r) }

// BuildCodeInterpreter makes the code interpreter template in opts.DataDir
// (alias CodeInterpreterAlias) and returns it: the base rootfs plus Debian's
// ipykernel, numpy, pandas, matplotlib and scipy, started with the code
// interpreter server. The rootfs is derived from the cached base rootfs
// (built first when missing) and cached under a hash of the base's key, the
// packages and the script, so only the first build on a machine runs apt
// (a few minutes); later ones take seconds, and a current template returns
// at once. Needs root, like BuildBase.
func BuildCodeInterpreter(ctx context.Context, opts BuildOptions) (Template, error) {
	t, _, err := buildCodeInterpreter(ctx, opts)
	return t, err
}

func buildCodeInterpreter(ctx context.Context, opts BuildOptions) (Template, buildOutcome, error) {
	start := time.Now()
	opts, err := opts.withDefaults()
	if err != nil {
		return Template{}, 0, err
	}
	p := newProgress(opts.Progress, CodeInterpreterAlias)
	reg, err := Open(opts.DataDir)
	if err != nil {
		return Template{}, 0, err
	}
	base, err := baseRecipe(opts)
	if err != nil {
		return Template{}, 0, err
	}
	rec := codeInterpreterRecipe{
		Version:  codeInterpreterRecipeVersion,
		Base:     base.key(),
		Packages: codeInterpreterPackages,
		Script:   codeInterpreterScript,
	}
	key := rec.key()
	buildID := buildIDFor(key, DefaultEnvdVersion)

	current, upToDate := installedTemplate(reg, CodeInterpreterAlias, buildID, opts.Force, p)
	if upToDate {
		return current, outcomeUpToDate, nil
	}
	if os.Geteuid() != 0 {
		return Template{}, 0, fmt.Errorf("build template %s: %w", CodeInterpreterAlias, ErrNotRoot)
	}

	p.logTo(filepath.Join(opts.CacheDir, "logs"), CodeInterpreterAlias)
	defer p.close()
	p.printf("build %s: base %s + %v, cache %s", buildID, rec.Base, rec.Packages, opts.CacheDir)
	c := cache{dir: opts.CacheDir, p: p}
	// The base tar comes first, under its own turn of the cache lock: the
	// derived build below takes the lock again and must not wait on itself.
	// Forcing rebuilds only the derived layer.
	baseArchive, _, err := c.rootfs(ctx, base.key(), base, false, c.debootstrap(base))
	if err != nil {
		return Template{}, 0, fmt.Errorf("build template %s: base rootfs: %w", CodeInterpreterAlias, err)
	}
	defer baseArchive.Close()
	archive, outcome, err := c.rootfs(ctx, key, rec, opts.Force, func(ctx context.Context, target string) error {
		if err := p.stage("extract base rootfs")(extractArchive(ctx, baseArchive, target, p)); err != nil {
			return err
		}
		// Debian package names hold no spaces or quotes.
		script := "PACKAGES='" + strings.Join(rec.Packages, " ") + "'\n" + rec.Script
		return c.configure(ctx, target, script, base.Suite, base.Mirror, base.SecurityMirror)
	})
	if err != nil {
		return Template{}, 0, fmt.Errorf("build template %s: %w", CodeInterpreterAlias, err)
	}
	defer archive.Close()

	id := current.TemplateID
	if id == "" {
		id = NewID()
	}
	t, err := installArchive(ctx, reg, p, archive, current, Template{
		TemplateID:  id,
		Aliases:     []string{CodeInterpreterAlias},
		BuildID:     buildID,
		CPUCount:    DefaultCPUCount,
		MemoryMB:    codeInterpreterMemoryMB,
		EnvdVersion: DefaultEnvdVersion,
		Public:      true,
		StartCmd:    CodeInterpreterStartCmd,
		ReadyCmd:    CodeInterpreterReadyCmd,
	})
	if err != nil {
		return Template{}, 0, err
	}
	p.printf("ready in %s (%s): template %s, diskSizeMB %d",
		time.Since(start).Round(100*time.Millisecond), outcome, t.TemplateID, t.DiskSizeMB)
	return t, outcome, nil
}
