package dockerfile

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// Context is a build context directory as the e2b SDK sees it for COPY:
// the files a source matches, their filesHash, and the tar to upload.
//
// The SDK's recipe (e2b 2.45–2.51, calculateFilesHash and
// getAllFilesInPath), which Hash reproduces:
//
//   - matches: glob(src, {dot: true, cwd: dir, ignore}); every matched
//     directory adds itself and glob("<dir>/**/*") under it (symlinked
//     directories are not descended); duplicates dropped; sorted by full
//     path;
//   - ignore: the SDK's fileIgnorePatterns plus the lines of
//     <dir>/.dockerignore (trimmed, blank and #-lines dropped), as glob's
//     ignore option: a path is left out when its relative path, or that
//     plus "/", matches a pattern (minimatch, dot: true, no negation); a
//     directory's children are left out only by a pattern ending in /**;
//   - hash: SHA-256 of "COPY <src> <dest>", then per match its relative
//     POSIX path, decimal st_mode (type bits included), decimal st_size, and
//     the file's bytes (regular files) or the link target (symlinks, unless
//     resolveSymlinks and the target is a file or directory: then the
//     target's stat and bytes). No uid, gid or mtime.
//
// The tar (spoolTarArchive, node-tar create with noDirRecurse) lists the
// same matches in the same order, by relative path (directories with a
// trailing /), permission bits as node-tar's modeFix makes them, uid, gid
// and mtime from lstat, symlinks as links, and a regular file already
// written under another name (same device and inode) as a hard link;
// gzip-compressed unless the step says gzip: false.
//
// Not reproduced, and refused with an error rather than hashed
// differently: extglob patterns (+(...), !(...) and friends) and {a..b}
// ranges.
type Context struct {
	Dir string
	// Ignore holds the patterns that leave files out: the SDK's
	// fileIgnorePatterns followed by .dockerignore (NewContext reads it).
	Ignore          []string
	ResolveSymlinks bool
}

// NewContext makes the Context of dir with its .dockerignore.
func NewContext(dir string, extraIgnore ...string) (Context, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Context{}, err
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return Context{}, fmt.Errorf("build context: %w", err)
	}
	if !fi.IsDir() {
		return Context{}, fmt.Errorf("build context %s is not a directory", dir)
	}
	ign, err := ReadDockerignore(abs)
	if err != nil {
		return Context{}, err
	}
	return Context{Dir: abs, Ignore: append(append([]string(nil), extraIgnore...), ign...)}, nil
}

// ReadDockerignore returns the patterns of dir/.dockerignore as the SDK
// reads them: lines trimmed, blank lines and lines starting with # dropped.
func ReadDockerignore(dir string) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(dir, ".dockerignore"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out, nil
}

// File is one path a COPY source matches.
type File struct {
	Rel  string // relative POSIX path ("" for the context directory itself)
	Full string
	Info fs.FileInfo // from lstat
}

// Files lists what src matches, in the SDK's order.
func (c Context) Files(src string) ([]File, error) {
	if err := buildspec.CheckSource(src); err != nil {
		return nil, err
	}
	ig, err := newIgnore(c.Ignore, c.Dir)
	if err != nil {
		return nil, err
	}
	g := &globber{c: c, ig: ig, out: map[string]File{}}
	if err := g.glob(src); err != nil {
		return nil, fmt.Errorf("COPY source %q: %w", src, err)
	}
	matches := g.out
	all := map[string]File{}
	for full, f := range matches {
		all[full] = f
		if !f.Info.IsDir() {
			continue
		}
		sub := &globber{c: c, ig: ig, out: all}
		pattern := "**/*"
		if f.Rel != "" {
			pattern = f.Rel + "/**/*"
		}
		if err := sub.glob(pattern); err != nil {
			return nil, err
		}
	}
	out := make([]File, 0, len(all))
	for _, f := range all {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Full < out[j].Full })
	if len(out) == 0 {
		return nil, fmt.Errorf("no files found in %s", c.full(src))
	}
	return out, nil
}

func (c Context) full(rel string) string {
	if rel == "" {
		return c.Dir
	}
	return c.Dir + "/" + rel
}

// globber walks a pattern over the context as node-glob does (dot: true,
// follow: false): plain segments and magic segments resolve through
// symlinks like any path; a ** walks real directories only, except that a
// ** which is not the pattern's first segment lets the rest of the pattern
// match inside a symlinked directory it meets (glob's "follow one symlink"
// rule).
type globber struct {
	c   Context
	ig  *ignore
	out map[string]File
}

func (g *globber) glob(pattern string) error {
	alts, err := expandBraces(pattern)
	if err != nil {
		return err
	}
	for _, a := range alts {
		segs := strings.Split(a, "/")
		for len(segs) > 1 && segs[0] == "." {
			segs = segs[1:]
		}
		dirOnly := false
		if len(segs) > 1 && segs[len(segs)-1] == "" {
			dirOnly, segs = true, segs[:len(segs)-1]
		}
		for i, s := range segs {
			if s != "**" && hasMagic(s) {
				m, err := compileSegments([]string{s})
				if err != nil {
					return err
				}
				segs[i] = m.alts[0][0]
			} else if s != "**" {
				segs[i] = "=" + unescape(s) // a literal segment
			}
		}
		g.walk("", segs, 0, dirOnly)
	}
	return nil
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func join(rel, name string) string {
	switch {
	case name == ".":
		return rel
	case rel == "":
		return name
	}
	return rel + "/" + name
}

func (g *globber) add(rel string, dirOnly bool) {
	full := g.c.full(rel)
	fi, err := os.Lstat(full)
	if err != nil {
		return
	}
	if dirOnly && !fi.IsDir() {
		if st, err := os.Stat(full); err != nil || !st.IsDir() {
			return
		}
	}
	f := File{Rel: rel, Full: full, Info: fi}
	if !g.ig.ignored(f) {
		g.out[full] = f
	}
}

// readdir lists rel unless the ignore patterns drop its children.
func (g *globber) readdir(rel string) []fs.DirEntry {
	if g.ig.childrenIgnored(File{Rel: rel, Full: g.c.full(rel)}) {
		return nil
	}
	ents, _ := os.ReadDir(g.c.full(rel))
	return ents
}

func (g *globber) walk(rel string, segs []string, idx int, dirOnly bool) {
	if len(segs) == 0 {
		g.add(rel, dirOnly)
		return
	}
	seg, rest := segs[0], segs[1:]
	switch {
	case seg == "**":
		g.walk(rel, rest, idx+1, dirOnly) // ** as zero segments
		for _, e := range g.readdir(rel) {
			child := join(rel, e.Name())
			full := g.c.full(child)
			lst, err := os.Lstat(full)
			if err != nil {
				continue
			}
			switch {
			case lst.IsDir():
				g.walk(child, segs, idx, dirOnly)
			case lst.Mode()&fs.ModeSymlink != 0 && idx > 0 && len(rest) > 0:
				if st, err := os.Stat(full); err == nil && st.IsDir() {
					g.walk(child, rest, idx+1, dirOnly)
				}
			case len(rest) == 0:
				g.add(child, dirOnly)
			}
		}
	case strings.HasPrefix(seg, "="):
		child := join(rel, seg[1:])
		if _, err := os.Lstat(g.c.full(child)); err != nil {
			return
		}
		g.walk(child, rest, idx+1, dirOnly)
	default:
		for _, e := range g.readdir(rel) {
			if matchSeg(seg, e.Name()) {
				g.walk(join(rel, e.Name()), rest, idx+1, dirOnly)
			}
		}
	}
}

// Hash is the SDK's filesHash of `COPY src dest` in this context.
func (c Context) Hash(src, dest string) (string, error) {
	files, err := c.Files(src)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	io.WriteString(h, "COPY "+src+" "+dest)
	for _, f := range files {
		io.WriteString(h, f.Rel)
		st := f.Info.Sys().(*syscall.Stat_t)
		if f.Info.Mode()&fs.ModeSymlink != 0 {
			target, terr := os.Stat(f.Full)
			if !(c.ResolveSymlinks && terr == nil && (target.Mode().IsRegular() || target.IsDir())) {
				io.WriteString(h, strconv.FormatUint(uint64(st.Mode), 10))
				io.WriteString(h, strconv.FormatInt(st.Size, 10))
				link, err := os.Readlink(f.Full)
				if err != nil {
					return "", err
				}
				io.WriteString(h, link)
				continue
			}
		}
		fi, err := os.Stat(f.Full)
		if err != nil {
			return "", err
		}
		fst := fi.Sys().(*syscall.Stat_t)
		io.WriteString(h, strconv.FormatUint(uint64(fst.Mode), 10))
		io.WriteString(h, strconv.FormatInt(fst.Size, 10))
		if fi.Mode().IsRegular() {
			r, err := os.Open(f.Full)
			if err != nil {
				return "", err
			}
			_, err = io.Copy(h, r)
			r.Close()
			if err != nil {
				return "", err
			}
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// HashCopies fills the FilesHash of every COPY step of spec.
func (c Context) HashCopies(spec *buildspec.Spec) error {
	for i, st := range spec.Steps {
		if st.Type != buildspec.Copy {
			continue
		}
		h, err := c.Hash(st.Args[0], st.Args[1])
		if err != nil {
			return fmt.Errorf("COPY %s: %w", st.Args[0], err)
		}
		spec.Steps[i].FilesHash = h
	}
	return nil
}

// WriteTar writes the tar the SDK uploads for a COPY of src.
func (c Context) WriteTar(w io.Writer, src string, gz bool) error {
	files, err := c.Files(src)
	if err != nil {
		return err
	}
	var zw *gzip.Writer
	if gz {
		zw = gzip.NewWriter(w)
		w = zw
	}
	tw := tar.NewWriter(w)
	type devIno struct{ dev, ino uint64 }
	links := map[devIno]string{}
	for _, f := range files {
		fi := f.Info
		if c.ResolveSymlinks && fi.Mode()&fs.ModeSymlink != 0 {
			if t, err := os.Stat(f.Full); err == nil {
				fi = t
			}
		}
		st := fi.Sys().(*syscall.Stat_t)
		name := f.Rel
		if name == "" {
			name = "."
		}
		h := &tar.Header{
			Name:    name,
			Mode:    int64(modeFix(uint32(st.Mode), fi.IsDir())),
			Uid:     int(st.Uid),
			Gid:     int(st.Gid),
			ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
			Format:  tar.FormatPAX,
		}
		switch {
		case fi.IsDir():
			h.Typeflag, h.Name = tar.TypeDir, name+"/"
		case fi.Mode()&fs.ModeSymlink != 0:
			h.Typeflag = tar.TypeSymlink
			if h.Linkname, err = os.Readlink(f.Full); err != nil {
				return err
			}
		case fi.Mode().IsRegular():
			key := devIno{uint64(st.Dev), st.Ino}
			if prev, ok := links[key]; ok && st.Nlink > 1 {
				h.Typeflag, h.Linkname = tar.TypeLink, prev
				break
			}
			if st.Nlink > 1 {
				links[key] = name
			}
			h.Typeflag, h.Size = tar.TypeReg, fi.Size()
		default:
			return fmt.Errorf("%s is not a file, directory or symlink", f.Full)
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg {
			r, err := os.Open(f.Full)
			if err != nil {
				return err
			}
			n, err := io.Copy(tw, io.LimitReader(r, h.Size))
			r.Close()
			if err != nil {
				return err
			}
			if n != h.Size {
				return fmt.Errorf("%s changed size while being read", f.Full)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if zw != nil {
		return zw.Close()
	}
	return nil
}

// modeFix is node-tar's: permission bits only, and a directory readable
// by someone is also listable by them.
func modeFix(mode uint32, dir bool) uint32 {
	mode &= 0o7777
	if dir {
		if mode&0o400 != 0 {
			mode |= 0o100
		}
		if mode&0o40 != 0 {
			mode |= 0o10
		}
		if mode&0o4 != 0 {
			mode |= 0o1
		}
	}
	return mode
}

// ignore is glob's ignore option (see Context).
type ignore struct {
	dir              string
	relative         []globMatcher
	absolute         []globMatcher
	relativeChildren []globMatcher
	absoluteChildren []globMatcher
}

func newIgnore(patterns []string, dir string) (*ignore, error) {
	ig := &ignore{dir: dir}
	for _, p := range patterns {
		alts, err := expandBraces(p)
		if err != nil {
			return nil, fmt.Errorf("ignore pattern %q: %w", p, err)
		}
		for _, a := range alts {
			segs := strings.Split(a, "/")
			for len(segs) > 1 && segs[0] == "." {
				segs = segs[1:]
			}
			m, err := compileSegments(segs)
			if err != nil {
				return nil, fmt.Errorf("ignore pattern %q: %w", p, err)
			}
			children := segs[len(segs)-1] == "**"
			if strings.HasPrefix(a, "/") {
				ig.absolute = append(ig.absolute, m)
				if children {
					ig.absoluteChildren = append(ig.absoluteChildren, m)
				}
			} else {
				ig.relative = append(ig.relative, m)
				if children {
					ig.relativeChildren = append(ig.relativeChildren, m)
				}
			}
		}
	}
	return ig, nil
}

func (ig *ignore) ignored(f File) bool {
	rel := f.Rel
	if rel == "" {
		rel = "."
	}
	for _, m := range ig.relative {
		if m.match(rel) || m.match(rel+"/") {
			return true
		}
	}
	for _, m := range ig.absolute {
		if m.match(f.Full) || m.match(f.Full+"/") {
			return true
		}
	}
	return false
}

func (ig *ignore) childrenIgnored(f File) bool {
	rel := f.Rel
	if rel == "" {
		rel = "."
	}
	for _, m := range ig.relativeChildren {
		if m.match(rel + "/") {
			return true
		}
	}
	for _, m := range ig.absoluteChildren {
		if m.match(f.Full + "/") {
			return true
		}
	}
	return false
}
