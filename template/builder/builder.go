// Package builder builds templates the E2B way, without a Docker engine:
// from an OCI image (template/oci) or another template, then the request's
// COPY, RUN, ENV, WORKDIR and USER steps (template/buildspec) in order. A RUN
// step runs inside a sandbox whose root is the image built so far (Runner:
// gVisor, the same isolation as any sandbox, under the default egress
// policy); a COPY step applies its uploaded tar (template/uploads). The
// result is installed as a template in the registry.
//
// Caching: every step has a key chained from the base's content and every
// input before it (buildspec.StepKey). The tree after each RUN step, the
// expensive kind, is kept under CacheDir/steps/<key>; a build starts from
// the latest cached RUN step whose key it reproduces and redoes only the
// steps after it. COPY, ENV, WORKDIR and USER are cheap and are redone.
// force (the request's or a step's) skips the cache from that step on.
//
// Images get what a sandbox needs (injectSandbox): the "user" account with
// its home and passwordless sudo where sudo exists, /tmp, and the mount
// points. envd is not copied in: every runtime mounts it.
package builder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/cubicle-dev/cubicle/internal/sparse"
	"github.com/cubicle-dev/cubicle/template"
	"github.com/cubicle-dev/cubicle/template/buildspec"
	"github.com/cubicle-dev/cubicle/template/oci"
	"github.com/cubicle-dev/cubicle/template/uploads"
)

// Command is one process a Runner runs.
type Command struct {
	Args []string
	// Env are "K=V"; Cwd is absolute; User is a name or uid[:gid] of the
	// image ("" is root).
	Env      []string
	Cwd      string
	User     string
	CPUCount int
	MemoryMB int
}

// Runner runs a command to its end in a sandbox whose root filesystem is
// the writable directory root, its output to out, and returns its exit
// status.
type Runner interface {
	Run(ctx context.Context, root string, cmd Command, out io.Writer) (int, error)
}

// Templates finds the template a build starts from, as its owner sees
// them (another owner's template is not found).
type Templates interface {
	Base(owner, ref string) (template.Template, string, error)
}

// Options configure a Builder.
type Options struct {
	Registry  *template.Registry
	Templates Templates
	Uploads   *uploads.Store
	// Images caches unpacked images; ImageOptions resolve them (plain-HTTP
	// registries, keychain).
	Images       oci.Cache
	ImageOptions oci.Options
	Runner       Runner
	// CacheDir keeps the trees after RUN steps (steps/<key>).
	CacheDir string
	Limits   uploads.Limits
	// InUse, when set, says why template id must not be replaced now
	// ("" if it may): checked again just before a build installs over an
	// existing template, which replaces its files.
	InUse func(id string) string
}

// Builder builds templates. It is safe for concurrent builds of different
// templates.
type Builder struct {
	opts Options
	// mu is held shared by builds and exclusively by a garbage
	// collection (gc.go), which must not remove what a build reads.
	mu sync.RWMutex
}

// New returns a Builder.
func New(opts Options) (*Builder, error) {
	if opts.Registry == nil || opts.Templates == nil || opts.Uploads == nil || opts.Runner == nil || opts.CacheDir == "" || opts.Images.Dir == "" {
		return nil, errors.New("builder: Registry, Templates, Uploads, Runner, Images and CacheDir are required")
	}
	if err := os.MkdirAll(filepath.Join(opts.CacheDir, "steps"), 0o700); err != nil {
		return nil, fmt.Errorf("builder: %w", err)
	}
	return &Builder{opts: opts}, nil
}

// Request is one build.
type Request struct {
	TemplateID string
	BuildID    string
	// Alias is the template's name ("" for none).
	Alias string
	Owner string
	// CPUCount and MemoryMB are the template's sandboxes' and its RUN
	// steps'; zero means the defaults.
	CPUCount int
	MemoryMB int
	Spec     buildspec.Spec
}

// Log receives a build's progress; step is "base", "finalize" or a step's
// number from 1.
type Log interface {
	Add(level, step, message string)
	// Output is where a RUN step's output goes, line by line.
	Output(step string) io.Writer
}

// StepError is a build's failure, and the step it failed in ("base",
// "finalize", or "<i+1>" for Spec.Steps[i]), as E2B's build status names it.
type StepError struct {
	Step string
	Err  error
}

func (e *StepError) Error() string { return e.Err.Error() }
func (e *StepError) Unwrap() error { return e.Err }

// injectVersion changes whenever injectSandbox does: it is in the key of
// every image-based build, so a change never reuses a tree made without it.
const injectVersion = "inject-v1"

// Build runs req and installs the template. On error nothing of the build
// is left but the step cache.
func (b *Builder) Build(ctx context.Context, req Request, log Log) (t template.Template, err error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if req.CPUCount == 0 {
		req.CPUCount = template.DefaultCPUCount
	}
	if req.MemoryMB == 0 {
		req.MemoryMB = template.DefaultMemoryMB
	}
	staging, err := b.opts.Registry.Stage(req.TemplateID)
	if err != nil {
		return t, &StepError{Step: "base", Err: err}
	}
	defer func() {
		if err != nil {
			os.RemoveAll(staging)
		}
	}()
	root := template.RootFSOf(staging)

	baseDir, state, key, injected, err := b.base(ctx, req, log)
	if err != nil {
		return t, &StepError{Step: "base", Err: err}
	}

	// The keys of every step, and the last cached RUN step to start from.
	keys := make([]string, len(req.Spec.Steps))
	states := make([]buildspec.State, len(req.Spec.Steps)+1)
	states[0] = state
	start, startDir := 0, baseDir
	force := req.Spec.Force
	for i, st := range req.Spec.Steps {
		digest := ""
		if st.Type == buildspec.Copy {
			f, e, err := b.opts.Uploads.Open(st.FilesHash)
			if err != nil {
				return t, &StepError{Step: strconv.Itoa(i + 1), Err: fmt.Errorf("COPY %s: the files were not uploaded: %w", strings.Join(st.Args[:2], " "), err)}
			}
			f.Close()
			digest = e.Digest
		}
		parent := key
		if i > 0 {
			parent = keys[i-1]
		}
		keys[i] = buildspec.StepKey(parent, states[i], st, digest)
		if states[i+1], err = states[i].Apply(st); err != nil {
			return t, &StepError{Step: strconv.Itoa(i + 1), Err: err}
		}
		force = force || st.Force
		if st.Type == buildspec.Run && !force {
			if dir := b.stepDir(keys[i]); isDir(dir) {
				start, startDir = i+1, dir
			}
		}
	}
	if start > 0 {
		log.Add("info", strconv.Itoa(start), fmt.Sprintf("steps 1 to %d: cached", start))
	}
	if start > 0 || !injected {
		touch(startDir) // a cached tree or an image: the collector's order
	}
	if err := sparse.CopyTree(ctx, startDir, root); err != nil {
		return t, &StepError{Step: "base", Err: err}
	}
	if start == 0 && !injected {
		// A tree from an image gets the sandbox's basics before any step.
		if err := b.inject(ctx, req, root, log); err != nil {
			return t, &StepError{Step: "base", Err: err}
		}
	}
	for i := start; i < len(req.Spec.Steps); i++ {
		st := req.Spec.Steps[i]
		name := strconv.Itoa(i + 1)
		log.Add("info", name, fmt.Sprintf("[%d/%d] %s %s", i+1, len(req.Spec.Steps), st.Type, strings.Join(st.Args, " ")))
		t0 := time.Now()
		out := log.Output(name)
		err := b.step(ctx, req, root, states[i], states[i+1], st, out)
		if f, ok := out.(interface{ Flush() }); ok {
			f.Flush()
		}
		if err != nil {
			return t, &StepError{Step: name, Err: err}
		}
		if st.Type == buildspec.Run {
			if err := b.keep(ctx, root, keys[i]); err != nil {
				log.Add("warn", name, "not cached: "+err.Error())
			}
		}
		log.Add("info", name, fmt.Sprintf("done in %.1fs", time.Since(t0).Seconds()))
	}

	final := states[len(req.Spec.Steps)]
	t = template.Template{
		TemplateID: req.TemplateID, BuildID: req.BuildID, CPUCount: req.CPUCount, MemoryMB: req.MemoryMB,
		CreatedAt: time.Now().UTC(), StartCmd: req.Spec.StartCmd, ReadyCmd: req.Spec.ReadyCmd,
		Owner: req.Owner, Env: final.Environ(), User: final.User, Workdir: final.Workdir,
	}
	if req.Alias != "" {
		t.Aliases = []string{req.Alias}
	}
	if b.opts.InUse != nil {
		if why := b.opts.InUse(t.TemplateID); why != "" {
			return t, &StepError{Step: "finalize", Err: fmt.Errorf("the template came into use during the build (%s): not replaced", why)}
		}
	}
	if err := b.opts.Registry.Install(t, staging); err != nil {
		return t, &StepError{Step: "finalize", Err: err}
	}
	log.Add("info", "finalize", fmt.Sprintf("template %s built (build %s)", t.TemplateID, t.BuildID))
	return t, nil
}

// base resolves the build's starting tree (read only: it is copied), the
// state it gives the first step, the base key, and whether the tree has
// the sandbox's basics already.
func (b *Builder) base(ctx context.Context, req Request, log Log) (dir string, s buildspec.State, key string, injected bool, err error) {
	spec := req.Spec
	if spec.FromTemplate != "" {
		t, rootfs, err := b.opts.Templates.Base(req.Owner, spec.FromTemplate)
		if err != nil {
			return "", s, "", false, err
		}
		log.Add("info", "base", fmt.Sprintf("from template %s (build %s)", spec.FromTemplate, t.BuildID))
		s = buildspec.State{User: t.User, Workdir: t.Workdir}
		for _, kv := range t.Env {
			if k, v, ok := strings.Cut(kv, "="); ok {
				s = s.Set(k, v)
			}
		}
		return rootfs, s, buildspec.BaseKey("template:" + t.TemplateID + "@" + t.BuildID), true, nil
	}
	opts := b.opts.ImageOptions
	if r := spec.FromImageRegistry; r != nil && r.Type == "registry" {
		opts.Auth = &authn.Basic{Username: r.Username, Password: r.Password}
	}
	log.Add("info", "base", "resolving image "+spec.FromImage)
	img, err := oci.Resolve(ctx, spec.FromImage, opts)
	if err != nil {
		return "", s, "", false, err
	}
	t0 := time.Now()
	dir, cfg, err := b.opts.Images.Unpacked(ctx, img)
	if err != nil {
		return "", s, "", false, err
	}
	log.Add("info", "base", fmt.Sprintf("image %s (%s) ready in %.1fs", spec.FromImage, cfg.Digest, time.Since(t0).Seconds()))
	// E2B's image builds run as root in / until told otherwise.
	s = buildspec.State{Workdir: cfg.WorkingDir}
	for _, kv := range cfg.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			s = s.Set(k, v)
		}
	}
	return dir, s, buildspec.BaseKey("image:" + cfg.Digest + "+" + injectVersion), false, nil
}

// step runs one step on root; before and after are the state around it.
func (b *Builder) step(ctx context.Context, req Request, root string, before, after buildspec.State, st buildspec.Step, out io.Writer) error {
	// run runs a step's own work (making a WORKDIR or a USER) as root in
	// /: the directory may not exist yet.
	run := func(user string, args ...string) error {
		code, err := b.opts.Runner.Run(ctx, root, Command{Args: args, Env: after.Environ(), Cwd: "/", User: user,
			CPUCount: req.CPUCount, MemoryMB: req.MemoryMB}, out)
		if err != nil {
			return err
		}
		if code != 0 {
			return fmt.Errorf("%s exited with status %d", st.Type, code)
		}
		return nil
	}
	switch st.Type {
	case buildspec.Run:
		cwd := before.Workdir
		if cwd == "" {
			cwd = homeOf(root, before.RunUser(st))
		}
		code, err := b.opts.Runner.Run(ctx, root, Command{Args: []string{"/bin/sh", "-c", st.Args[0]}, Env: before.Environ(),
			Cwd: cwd, User: before.RunUser(st), CPUCount: req.CPUCount, MemoryMB: req.MemoryMB}, out)
		if err != nil {
			return err
		}
		if code != 0 {
			return fmt.Errorf("RUN %s: exited with status %d", st.Args[0], code)
		}
		return nil
	case buildspec.Copy:
		f, _, err := b.opts.Uploads.Open(st.FilesHash)
		if err != nil {
			return err
		}
		defer f.Close()
		return uploads.ApplyCopy(root, before, st, f, b.opts.Limits)
	case buildspec.Workdir:
		if after.Workdir == "" || !filepath.IsAbs(after.Workdir) {
			return nil
		}
		return run("", "/bin/sh", "-c", `mkdir -p -- "$1"`, "sh", after.Workdir)
	case buildspec.User:
		// As E2B's builder: the user is made when missing, a sudoer when
		// asked.
		script := `id -u -- "$1" >/dev/null 2>&1 || useradd -m -s /bin/sh -- "$1" 2>/dev/null || adduser -D -- "$1"`
		if after.Sudo {
			script += `; mkdir -p /etc/sudoers.d && echo "$1 ALL=(ALL:ALL) NOPASSWD: ALL" > "/etc/sudoers.d/$1" && chmod 0440 "/etc/sudoers.d/$1"`
		}
		name, _, _ := strings.Cut(after.User, ":")
		return run("", "/bin/sh", "-c", script, "sh", name)
	case buildspec.Env:
		return nil
	}
	return fmt.Errorf("unknown step type %q", st.Type)
}

// inject gives a tree from an image what a sandbox needs: the user
// "user" (uid 1000 where free) with a home and passwordless sudo if sudo
// is installed, a world-writable /tmp, and the mount points. It runs in
// the image, with its own tools, as E2B's builder does.
func (b *Builder) inject(ctx context.Context, req Request, root string, log Log) error {
	for _, d := range []string{"proc", "dev", "sys", "tmp", "run", "home"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	script := `set -e
chmod 1777 /tmp
if ! id -u user >/dev/null 2>&1; then
  if command -v useradd >/dev/null 2>&1; then useradd -m -s /bin/bash -u 1000 user 2>/dev/null || useradd -m -s /bin/sh user
  elif command -v adduser >/dev/null 2>&1; then adduser -D -u 1000 user 2>/dev/null || adduser -D user
  else echo "user:x:1000:1000::/home/user:/bin/sh" >> /etc/passwd; echo "user:x:1000:" >> /etc/group; mkdir -p /home/user; chown 1000:1000 /home/user
  fi
fi
if [ -d /etc/sudoers.d ] || command -v sudo >/dev/null 2>&1; then
  mkdir -p /etc/sudoers.d && echo "user ALL=(ALL:ALL) NOPASSWD: ALL" > /etc/sudoers.d/user && chmod 0440 /etc/sudoers.d/user
fi`
	if _, err := os.Stat(filepath.Join(root, "bin", "sh")); err != nil {
		log.Add("warn", "base", "the image has no /bin/sh: the user account was not added")
		return nil
	}
	code, err := b.opts.Runner.Run(ctx, root, Command{Args: []string{"/bin/sh", "-c", script}, Cwd: "/",
		CPUCount: req.CPUCount, MemoryMB: req.MemoryMB}, log.Output("base"))
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("adding the sandbox user to the image: exit status %d", code)
	}
	return nil
}

// homeOf is user's home directory in root's /etc/passwd, or "/".
func homeOf(root, user string) string {
	if user == "" || user == "root" || user == "0" {
		return "/root"
	}
	name, _, _ := strings.Cut(user, ":")
	o, err := uploads.LookupOwner(root, name)
	if err == nil && o.Home != "" {
		return o.Home
	}
	return "/"
}

func (b *Builder) stepDir(key string) string {
	return filepath.Join(b.opts.CacheDir, "steps", key)
}

// keep copies root into the step cache under key, atomically.
func (b *Builder) keep(ctx context.Context, root, key string) error {
	dst := b.stepDir(key)
	if isDir(dst) {
		return nil
	}
	tmp := dst + ".tmp-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := sparse.CopyTree(ctx, root, tmp); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.RemoveAll(tmp)
		if isDir(dst) {
			return nil // another build kept it first
		}
		return err
	}
	return nil
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
