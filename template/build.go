package template

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"time"
)

// DefaultMirror is the Debian mirror used when BuildOptions.Mirror is empty.
const DefaultMirror = "http://deb.debian.org/debian"

// DefaultSecurityMirror is the Debian security archive used when
// BuildOptions.SecurityMirror is empty. Debian publishes security updates
// only there, not through ordinary mirrors.
const DefaultSecurityMirror = "http://deb.debian.org/debian-security"

// NoSecurityMirror as BuildOptions.SecurityMirror builds without security
// updates, for hosts that can reach only a local mirror.
const NoSecurityMirror = "none"

// recipeVersion names the version of what this file does to make a rootfs
// beyond the inputs in baseRecipe (for example the tar flags). Bump it when
// that changes so every cache misses once.
const recipeVersion = 1

// baseSuite is the Debian release the base template is built from.
const baseSuite = "bookworm"

// basePackages are installed on top of minbase. Each costs little and is
// something an agent reaches for; npm is left out because Debian's pulls in
// a whole C++ toolchain (about +500 MB).
var basePackages = []string{
	"bash", "coreutils", "procps", "psmisc", "less", "sudo", "tzdata",
	"ca-certificates", "curl", "git", "openssh-client",
	"netbase", "iproute2", "iputils-ping",
	"python3", "python3-pip", "python3-venv", "python-is-python3",
	"nodejs",
	"jq", "nano", "vim-tiny", "unzip", "zip", "xz-utils",
}

// BuildOptions configures BuildBase.
type BuildOptions struct {
	// DataDir is the data directory whose registry receives the template.
	// Required.
	DataDir string
	// CacheDir holds machine-wide build artifacts that outlive data
	// directories. Default: DefaultCacheDir().
	CacheDir string
	// Mirror is the Debian mirror to bootstrap from; it is also written to
	// the rootfs's sources.list. Default: DefaultMirror.
	Mirror string
	// SecurityMirror is where security updates come from during the build
	// and in the rootfs's sources.list; NoSecurityMirror leaves them out.
	// Default: DefaultSecurityMirror.
	SecurityMirror string
	// Progress receives line-by-line progress. Nil discards it.
	Progress io.Writer
	// Force rebuilds the rootfs from the mirror even when the cache holds
	// one for the same inputs, for example to take in package updates, and
	// reinstalls the template even when it is up to date.
	Force bool
}

// DefaultCacheDir is $CUBICLE_CACHE_DIR, or /var/cache/cubicle without it.
func DefaultCacheDir() string {
	if d := os.Getenv("CUBICLE_CACHE_DIR"); d != "" {
		return d
	}
	return "/var/cache/cubicle"
}

func (o BuildOptions) withDefaults() (BuildOptions, error) {
	if o.DataDir == "" {
		return o, errors.New("build template: BuildOptions.DataDir is required")
	}
	if o.CacheDir == "" {
		o.CacheDir = DefaultCacheDir()
	}
	abs, err := filepath.Abs(o.CacheDir)
	if err != nil {
		return o, fmt.Errorf("build template: cache dir: %w", err)
	}
	o.CacheDir = abs // debootstrap --cache-dir wants an absolute path
	if o.Mirror == "" {
		o.Mirror = DefaultMirror
	}
	if o.SecurityMirror == "" {
		o.SecurityMirror = DefaultSecurityMirror
	}
	return o, nil
}

// recipe is every input that decides the content of the base rootfs. Its
// hash keys the cache, so anything that changes the result must be in it.
type recipe struct {
	Version        int      `json:"version"`
	Suite          string   `json:"suite"`
	Variant        string   `json:"variant"`
	Arch           string   `json:"arch"`
	Mirror         string   `json:"mirror"`
	SecurityMirror string   `json:"securityMirror"`
	Packages       []string `json:"packages"`
	Script         string   `json:"script"`
}

func baseRecipe(o BuildOptions) (recipe, error) {
	arch, ok := debianArch[runtime.GOARCH]
	if !ok {
		return recipe{}, fmt.Errorf("build template: no Debian architecture for GOARCH %s", runtime.GOARCH)
	}
	return recipe{
		Version:        recipeVersion,
		Suite:          baseSuite,
		Variant:        "minbase",
		Arch:           arch,
		Mirror:         o.Mirror,
		SecurityMirror: o.SecurityMirror,
		Packages:       basePackages,
		Script:         configureScript,
	}, nil
}

// debianArch maps GOARCH to Debian's architecture names, so the rootfs
// matches the host the sandboxes run on.
var debianArch = map[string]string{"amd64": "amd64", "arm64": "arm64"}

// key is the recipe's cache key.
func (r recipe) key() string { return recipeKey(r) }

// recipeKey is a recipe's cache key: 32 hex digits of the SHA-256 of its
// JSON. Recipes hold only strings, ints and slices of them.
func recipeKey(r any) string {
	b, err := json.Marshal(r)
	if err != nil {
		panic(fmt.Sprintf("template: encode recipe: %v", err)) // only strings and ints: cannot fail
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// buildIDFor derives the template's buildID, in the UUID form E2B uses, from
// the rootfs cache key and the metadata that is not part of the rootfs. The
// same inputs give the same buildID, which is how BuildBase knows an
// installed template is current.
func buildIDFor(key, envdVersion string) string {
	sum := sha256.Sum256([]byte(key + "\x00" + envdVersion))
	h := hex.EncodeToString(sum[:16])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// buildOutcome says how BuildBase got its template; tests check it.
type buildOutcome int

const (
	outcomeUpToDate buildOutcome = iota // installed template already current
	outcomeCacheHit                     // rootfs extracted from the cache
	outcomeBuilt                        // rootfs built with debootstrap
)

func (o buildOutcome) String() string {
	switch o {
	case outcomeUpToDate:
		return "up to date"
	case outcomeCacheHit:
		return "cache hit"
	case outcomeBuilt:
		return "built"
	}
	return fmt.Sprintf("buildOutcome(%d)", int(o))
}

// BuildBase makes the base template in opts.DataDir and returns it: Debian
// bookworm with bash, python3, node, git, curl, sudo and friends, and the
// sandbox user "user" (uid 1000, passwordless sudo). The first build on a
// machine runs debootstrap (a minute or two, needs root and the mirror);
// later ones extract the cached rootfs in seconds, and one whose template is
// already current returns at once. Concurrent builds, in any processes, are
// safe.
//
// Replacing a template removes its old rootfs, so it must not run while
// sandboxes of the old base are running (Force, or a changed recipe).
func BuildBase(ctx context.Context, opts BuildOptions) (Template, error) {
	t, _, err := buildBase(ctx, opts)
	return t, err
}

func buildBase(ctx context.Context, opts BuildOptions) (Template, buildOutcome, error) {
	start := time.Now()
	opts, err := opts.withDefaults()
	if err != nil {
		return Template{}, 0, err
	}
	p := newProgress(opts.Progress, BaseID)
	reg, err := Open(opts.DataDir)
	if err != nil {
		return Template{}, 0, err
	}
	rec, err := baseRecipe(opts)
	if err != nil {
		return Template{}, 0, err
	}
	key := rec.key()
	buildID := buildIDFor(key, DefaultEnvdVersion)

	current, upToDate := installedTemplate(reg, BaseID, buildID, opts.Force, p)
	if upToDate {
		return current, outcomeUpToDate, nil
	}
	if os.Geteuid() != 0 {
		return Template{}, 0, fmt.Errorf("build template %s: %w", BaseID, ErrNotRoot)
	}

	p.logTo(filepath.Join(opts.CacheDir, "logs"), BaseID)
	defer p.close()
	p.printf("build %s: debian %s %s/%s, cache %s", buildID, rec.Suite, rec.Variant, rec.Arch, opts.CacheDir)
	c := cache{dir: opts.CacheDir, p: p}
	archive, outcome, err := c.rootfs(ctx, key, rec, opts.Force, c.debootstrap(rec))
	if err != nil {
		return Template{}, 0, fmt.Errorf("build template %s: %w", BaseID, err)
	}
	defer archive.Close()

	t, err := installArchive(ctx, reg, p, archive, current, Template{
		TemplateID:  BaseID,
		Aliases:     []string{BaseID},
		BuildID:     buildID,
		CPUCount:    DefaultCPUCount,
		MemoryMB:    DefaultMemoryMB,
		EnvdVersion: DefaultEnvdVersion,
		Public:      true,
	})
	if err != nil {
		return Template{}, 0, err
	}
	p.printf("ready in %s (%s): %s, diskSizeMB %d",
		time.Since(start).Round(100*time.Millisecond), outcome, reg.RootFS(t), t.DiskSizeMB)
	return t, outcome, nil
}

// installedTemplate looks up idOrAlias in reg and reports whether it is
// current: built as buildID, with its rootfs in place, and no rebuild
// forced. An unreadable template counts as absent, since a rebuild is what
// repairs it.
func installedTemplate(reg *Registry, idOrAlias, buildID string, force bool, p *progress) (current Template, upToDate bool) {
	current, err := reg.Get(idOrAlias)
	switch {
	case err == nil:
		if !force && current.BuildID == buildID && isDir(reg.RootFS(current)) {
			p.printf("up to date (build %s) in %s", buildID, reg.RootFS(current))
			return current, true
		}
		return current, false
	case errors.Is(err, ErrNotFound):
	default:
		p.printf("replacing unreadable template: %v", err)
	}
	return Template{}, false
}

// installArchive extracts the rootfs tar read from archive into a staging
// directory and installs it as template t, sizing its disk from what the
// rootfs uses. A rebuild of current keeps its creation time: it is the same
// template, newer.
func installArchive(ctx context.Context, reg *Registry, p *progress, archive *os.File, current, t Template) (Template, error) {
	staging, err := reg.stage(t.TemplateID)
	if err != nil {
		return Template{}, err
	}
	installed := false
	defer func() {
		if !installed {
			os.RemoveAll(staging)
		}
	}()
	rootfs := filepath.Join(staging, rootfsDir)
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return Template{}, fmt.Errorf("build template %s: %w", t.TemplateID, err)
	}
	if err := p.stage("extract rootfs")(extractArchive(ctx, archive, rootfs, p)); err != nil {
		return Template{}, fmt.Errorf("build template %s: %w", t.TemplateID, err)
	}
	used, err := diskUsage(rootfs)
	if err != nil {
		return Template{}, fmt.Errorf("build template %s: %w", t.TemplateID, err)
	}
	t.DiskSizeMB = diskSizeMB(used)
	t.CreatedAt = time.Now().UTC().Truncate(time.Second)
	if !current.CreatedAt.IsZero() {
		t.CreatedAt = current.CreatedAt
	}
	if err := p.stage("install template")(reg.install(t, staging)); err != nil {
		return Template{}, fmt.Errorf("build template %s: %w", t.TemplateID, err)
	}
	installed = true
	p.printf("installed %s: %d MiB on disk", reg.RootFS(t), used>>20)
	return t, nil
}

// diskSizeMB sizes a sandbox's root disk for a rootfs using used bytes: the
// rootfs plus 1 GiB of room to work, plus 10% for ext4's own metadata,
// rounded up to 256 MiB, and never below DefaultDiskSizeMB.
func diskSizeMB(used int64) int {
	mb := (used>>20 + 1024) * 11 / 10
	mb = (mb + 255) / 256 * 256
	return int(max(mb, DefaultDiskSizeMB))
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// errNotExist reports whether err says a file is missing.
func errNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
