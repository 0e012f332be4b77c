package template

// Concurrency: readers (Get, List, RootFS) take no lock; they only ever see
// complete template directories because every change is a rename. Writers
// (Put, Delete, install) hold an exclusive flock on <templates>/.lock, across
// processes, so an alias check and the change it guards cannot interleave
// with another writer's.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

const (
	metadataFile = "template.json"
	rootfsDir    = "rootfs"
	lockFile     = ".lock"
	// Work directories are dot-named so List never mistakes them for
	// templates, and carry the owner's pid so a later writer can tell a
	// crashed writer's leftovers from a live one's.
	stagingPrefix = ".staging-"
	trashPrefix   = ".trash-"
)

// Registry is the set of templates in one data directory.
type Registry struct {
	dir string // <dataDir>/templates
}

// Open returns the registry of dataDir, creating <dataDir>/templates if it
// does not exist yet.
func Open(dataDir string) (*Registry, error) {
	if dataDir == "" {
		return nil, errors.New("template registry: empty data dir")
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, fmt.Errorf("template registry: %w", err)
	}
	dir := filepath.Join(abs, "templates")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("template registry: %w", err)
	}
	return &Registry{dir: dir}, nil
}

// RootFS returns the path of t's root filesystem directory, or "" when t's ID
// is not a valid one (so a forged ID cannot point outside the registry).
func (r *Registry) RootFS(t Template) string {
	if !ValidID(t.TemplateID) {
		return ""
	}
	return filepath.Join(r.dir, t.TemplateID, rootfsDir)
}

// Get returns the template whose ID or alias is idOrAlias. An ID wins over an
// alias; errors.Is(err, ErrNotFound) when neither matches.
func (r *Registry) Get(idOrAlias string) (Template, error) {
	if ValidID(idOrAlias) {
		t, err := r.read(idOrAlias)
		if !errors.Is(err, ErrNotFound) {
			return t, err
		}
	}
	all, err := r.List()
	if err != nil {
		return Template{}, err
	}
	for _, t := range all {
		if t.hasAlias(idOrAlias) {
			return t, nil
		}
	}
	return Template{}, fmt.Errorf("template %q: %w", idOrAlias, ErrNotFound)
}

// List returns every template, oldest first. A directory whose template.json
// is unreadable is left out with a warning rather than failing the listing,
// so one damaged template does not hide the others.
func (r *Registry) List() ([]Template, error) {
	entries, err := os.ReadDir(r.dir)
	if err != nil {
		return nil, fmt.Errorf("list templates: %w", err)
	}
	var out []Template
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		t, err := r.read(e.Name())
		if errors.Is(err, ErrNotFound) {
			continue // not a template (or deleted while we listed)
		}
		if err != nil {
			slog.Warn("skipping unreadable template", "dir", filepath.Join(r.dir, e.Name()), "err", err)
			continue
		}
		out = append(out, t)
	}
	slices.SortFunc(out, func(a, b Template) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.TemplateID, b.TemplateID)
	})
	return out, nil
}

// Put replaces the metadata of an existing template (aliases, resources,
// public, ...) atomically. The rootfs is untouched; a template with a new
// rootfs comes from a builder such as BuildBase.
func (r *Registry) Put(t Template) error {
	t = t.withDefaults()
	if err := t.validate(); err != nil {
		return err
	}
	unlock, err := r.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := r.read(t.TemplateID); err != nil {
		return err
	}
	if err := r.checkAliases(t); err != nil {
		return err
	}
	return writeJSONAtomic(filepath.Join(r.dir, t.TemplateID, metadataFile), t)
}

// Delete removes the template whose ID or alias is idOrAlias. It disappears
// at once (a rename); its files are removed afterwards.
func (r *Registry) Delete(idOrAlias string) error {
	unlock, err := r.lock()
	if err != nil {
		return err
	}
	defer unlock()
	t, err := r.Get(idOrAlias)
	if err != nil {
		return err
	}
	trash, err := r.workDir(trashPrefix, t.TemplateID)
	if err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(r.dir, t.TemplateID), filepath.Join(trash, t.TemplateID)); err != nil {
		return fmt.Errorf("delete template %s: %w", t.TemplateID, err)
	}
	if err := syncDir(r.dir); err != nil {
		return fmt.Errorf("delete template %s: %w", t.TemplateID, err)
	}
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("delete template %s: remove files: %w", t.TemplateID, err)
	}
	return nil
}

// Stage makes an empty work directory for template id, for a builder
// outside this package: it fills <dir>/rootfs and hands the directory to
// Install, or removes it.
func (r *Registry) Stage(id string) (string, error) { return r.stage(id) }

// Install puts a directory from Stage in place as template t (see install).
func (r *Registry) Install(t Template, staging string) error { return r.install(t, staging) }

// RootFSOf is the root filesystem directory inside a directory from Stage.
func RootFSOf(staging string) string { return filepath.Join(staging, rootfsDir) }

// stage makes an empty work directory for a template that is being made. The
// builder fills <staging>/rootfs and hands the directory to install; it lies
// in the registry's own directory so install can rename it into place.
func (r *Registry) stage(id string) (string, error) {
	if !ValidID(id) {
		return "", fmt.Errorf("%w: id %q", ErrInvalid, id)
	}
	return r.workDir(stagingPrefix, id)
}

// install writes t's metadata into staging (from stage, with rootfs/ filled)
// and puts staging in place as template t, replacing any template with the
// same ID in one atomic step. On success staging no longer exists.
func (r *Registry) install(t Template, staging string) error {
	t = t.withDefaults()
	if err := t.validate(); err != nil {
		return err
	}
	if filepath.Dir(staging) != r.dir || !strings.HasPrefix(filepath.Base(staging), stagingPrefix+t.TemplateID+"-") {
		return fmt.Errorf("install template %s: %s is not a staging directory of this registry", t.TemplateID, staging)
	}
	if err := writeJSONAtomic(filepath.Join(staging, metadataFile), t); err != nil {
		return fmt.Errorf("install template %s: %w", t.TemplateID, err)
	}
	// The rename below must not become durable before the files it
	// publishes; syncfs flushes the whole tree in one call.
	if err := syncFS(staging); err != nil {
		return fmt.Errorf("install template %s: %w", t.TemplateID, err)
	}

	unlock, err := r.lock()
	if err != nil {
		return err
	}
	defer unlock()
	r.sweep()
	if err := r.checkAliases(t); err != nil {
		return err
	}
	old, err := swapDir(staging, filepath.Join(r.dir, t.TemplateID), r.dir)
	if err != nil {
		return fmt.Errorf("install template %s: %w", t.TemplateID, err)
	}
	if err := syncDir(r.dir); err != nil {
		return fmt.Errorf("install template %s: %w", t.TemplateID, err)
	}
	if old != "" {
		if err := os.RemoveAll(old); err != nil {
			// The new template is in place; a leftover is swept later.
			slog.Warn("removing replaced template", "dir", old, "err", err)
		}
	}
	return nil
}

// read loads template id's metadata; ErrNotFound when it has none.
func (r *Registry) read(id string) (Template, error) {
	path := filepath.Join(r.dir, id, metadataFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Template{}, fmt.Errorf("template %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return Template{}, fmt.Errorf("read template %s: %w", id, err)
	}
	var t Template
	if err := json.Unmarshal(b, &t); err != nil {
		return Template{}, fmt.Errorf("read %s: %w", path, err)
	}
	if t.TemplateID != id {
		return Template{}, fmt.Errorf("%w: %s names template %q", ErrInvalid, path, t.TemplateID)
	}
	return t.withDefaults(), nil
}

// checkAliases fails with ErrAliasTaken if another template holds one of
// t's aliases. An alias that is some other template's ID is refused too,
// since Get would never reach it.
func (r *Registry) checkAliases(t Template) error {
	all, err := r.List()
	if err != nil {
		return err
	}
	for _, other := range all {
		if other.TemplateID == t.TemplateID {
			continue
		}
		for _, a := range t.Aliases {
			if other.hasAlias(a) || other.TemplateID == a {
				return fmt.Errorf("alias %q of template %s: held by %s: %w", a, t.TemplateID, other.TemplateID, ErrAliasTaken)
			}
		}
	}
	return nil
}

// lock takes the registry's writer lock.
func (r *Registry) lock() (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(r.dir, lockFile), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("template registry lock: %w", err)
	}
	if err := flockRetry(f, syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("template registry lock: %w", err)
	}
	// Closing the file releases the flock.
	return func() { f.Close() }, nil
}

// workDir makes <templates>/<prefix><id>-<pid>-<random>.
func (r *Registry) workDir(prefix, id string) (string, error) {
	dir, err := os.MkdirTemp(r.dir, fmt.Sprintf("%s%s-%d-", prefix, id, os.Getpid()))
	if err != nil {
		return "", fmt.Errorf("template work dir: %w", err)
	}
	return dir, nil
}

// sweep removes work directories whose owning process is gone: what a
// crashed build or delete left behind. Called with the writer lock held.
func (r *Registry) sweep() {
	entries, err := os.ReadDir(r.dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, stagingPrefix) && !strings.HasPrefix(name, trashPrefix) {
			continue
		}
		// .<kind>-<id>-<pid>-<random>; IDs contain no '-'.
		parts := strings.SplitN(name, "-", 4)
		if len(parts) != 4 {
			continue
		}
		pid, err := strconv.Atoi(parts[2])
		if err != nil || processAlive(pid) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(r.dir, name)); err != nil {
			slog.Warn("removing stale template work dir", "dir", name, "err", err)
		}
	}
}

// swapDir puts directory src at dst. If dst exists, the two are exchanged
// atomically (renameat2 RENAME_EXCHANGE) so readers see either the old or
// the new tree, never neither; the old tree is then at the returned path for
// the caller to remove. Filesystems without RENAME_EXCHANGE get two renames,
// with a moment in between where dst does not exist.
func swapDir(src, dst, parent string) (old string, err error) {
	err = os.Rename(src, dst)
	if err == nil {
		return "", nil
	}
	if !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
		return "", err
	}
	err = unix.Renameat2(unix.AT_FDCWD, src, unix.AT_FDCWD, dst, unix.RENAME_EXCHANGE)
	if err == nil {
		return src, nil
	}
	if !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOSYS) {
		return "", fmt.Errorf("exchange %s and %s: %w", src, dst, err)
	}
	old = filepath.Join(parent, trashPrefix+filepath.Base(dst)+"-"+strconv.Itoa(os.Getpid())+"-swap")
	if err := os.Rename(dst, old); err != nil {
		return "", err
	}
	if err := os.Rename(src, dst); err != nil {
		// Put the old template back rather than leave none.
		if rerr := os.Rename(old, dst); rerr != nil {
			return "", fmt.Errorf("%w (and restoring the old template: %v)", err, rerr)
		}
		return "", err
	}
	return old, nil
}

// processAlive reports whether pid names a live process (possibly another
// user's, hence EPERM counts as alive).
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
