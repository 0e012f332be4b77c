package builder

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Garbage collection. What builds leave behind is all reproducible: the
// trees after RUN steps (CacheDir/steps), unpacked images (Images.Dir) and
// COPY uploads (the SDK uploads again what the server says it lacks).
// CollectGarbage removes the least recently used of them until together
// they take at most a cap. Nothing a sandbox needs is among them: a
// template's root filesystem is its own copy in the registry, and
// snapshots and pauses are the orchestrator's. Builds and collections
// exclude each other (Builder.mu), so a collection never removes what a
// build is reading.

// artifact is one collectable thing: a directory tree or a file.
type artifact struct {
	path  string
	bytes int64
	used  time.Time
	// remove removes it.
	remove func() error
}

// GCReport says what a collection found and removed.
type GCReport struct {
	Artifacts    int
	Bytes        int64
	Removed      int
	RemovedBytes int64
}

// CollectGarbage removes least recently used build artifacts until they
// take at most max bytes (max < 0: no cap, nothing removed).
func (b *Builder) CollectGarbage(ctx context.Context, max int64) (GCReport, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var arts []artifact
	addDirs := func(dir string, keep func(name string) bool) {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if !keep(e.Name()) {
				continue
			}
			p := filepath.Join(dir, e.Name())
			fi, err := os.Stat(p)
			if err != nil {
				continue
			}
			arts = append(arts, artifact{path: p, bytes: treeBytes(p), used: fi.ModTime(), remove: func() error { return os.RemoveAll(p) }})
		}
	}
	addDirs(filepath.Join(b.opts.CacheDir, "steps"), func(n string) bool { return !strings.Contains(n, ".tmp-") })
	// The image cache's entries; its locks and half-made trees are its own.
	addDirs(b.opts.Images.Dir, func(n string) bool { return !strings.HasPrefix(n, ".") })
	ups, err := b.opts.Uploads.List()
	if err != nil {
		return GCReport{}, err
	}
	for _, u := range ups {
		arts = append(arts, artifact{path: u.Hash, bytes: u.Size, used: u.ModTime, remove: func() error { return b.opts.Uploads.Remove(u.Hash) }})
	}
	var rep GCReport
	rep.Artifacts = len(arts)
	for _, a := range arts {
		rep.Bytes += a.bytes
	}
	if max < 0 {
		return rep, nil
	}
	slices.SortFunc(arts, func(x, y artifact) int { return x.used.Compare(y.used) })
	total := rep.Bytes
	for _, a := range arts {
		if total <= max || ctx.Err() != nil {
			break
		}
		if err := a.remove(); err != nil {
			return rep, err
		}
		total -= a.bytes
		rep.Removed++
		rep.RemovedBytes += a.bytes
	}
	return rep, nil
}

// touch records that path was used now, for the collector's order.
func touch(path string) {
	now := time.Now()
	os.Chtimes(path, now, now)
}

// treeBytes is the disk space path takes: allocated blocks, so sparse
// files count for what they hold and hard links once per walk.
func treeBytes(path string) int64 {
	var n int64
	seen := map[uint64]bool{}
	filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if st.Nlink > 1 && !d.IsDir() {
				if seen[st.Ino] {
					return nil
				}
				seen[st.Ino] = true
			}
			n += st.Blocks * 512
		}
		return nil
	})
	return n
}
