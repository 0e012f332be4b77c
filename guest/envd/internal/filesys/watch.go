package filesys

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
)

// watchMask selects the inotify events that map to protocol events (see
// eventTypes). IN_ONLYDIR: only directories are watched; files are seen through
// their directory.
const watchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MODIFY | unix.IN_ATTRIB |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// watchEventBuffer is how many events a watcher holds for a slow consumer before its
// reader waits; the kernel then queues more and finally reports an overflow.
const watchEventBuffer = 256

// watcher turns inotify events under one directory into protocol events, watching
// subdirectories too (including ones created later) when recursive.
type watcher struct {
	log          *slog.Logger
	root         string
	recursive    bool
	includeEntry bool
	file         *os.File // the inotify descriptor, pollable so Close ends run

	mu   sync.Mutex     // guards dirs
	dirs map[int]string // watch descriptor → watched directory

	events chan *pb.FilesystemEvent // closed when run returns
	done   chan struct{}            // closed by close
	once   sync.Once
}

func newWatcher(log *slog.Logger, root string, recursive, includeEntry bool) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify_init1: %w", err)
	}
	w := &watcher{
		log:          log,
		root:         root,
		recursive:    recursive,
		includeEntry: includeEntry,
		// A non-blocking descriptor makes os.NewFile register it with the runtime
		// poller, so a blocked Read returns when the file is closed.
		file:   os.NewFile(uintptr(fd), "inotify"),
		dirs:   map[int]string{},
		events: make(chan *pb.FilesystemEvent, watchEventBuffer),
		done:   make(chan struct{}),
	}
	if err := w.add(root); err != nil {
		w.file.Close()
		return nil, err
	}
	if recursive {
		w.addTree(root)
	}
	go w.run()
	return w, nil
}

// close stops the watcher; events is closed soon after.
func (w *watcher) close() {
	w.once.Do(func() {
		close(w.done)
		w.file.Close()
	})
}

// add watches one directory.
func (w *watcher) add(dir string) error {
	rc, err := w.file.SyscallConn()
	if err != nil {
		return err
	}
	var wd int
	var addErr error
	if err := rc.Control(func(fd uintptr) { wd, addErr = unix.InotifyAddWatch(int(fd), dir, watchMask) }); err != nil {
		return err
	}
	if addErr != nil {
		return fmt.Errorf("watch %s: %w", dir, addErr)
	}
	w.mu.Lock()
	w.dirs[wd] = dir
	w.mu.Unlock()
	return nil
}

// addTree watches every directory below dir. Directories that vanish or cannot be
// read meanwhile are skipped: the tree is live.
func (w *watcher) addTree(dir string) {
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if d != nil && d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if d.IsDir() && p != dir {
			if err := w.add(p); err != nil {
				w.log.Debug("cannot watch subdirectory", "dir", p, "err", err)
				return fs.SkipDir
			}
		}
		return nil
	})
}

// forgetTree stops watching dir and everything below it (it was moved away: its
// watch descriptors would now report under a stale path).
func (w *watcher) forgetTree(dir string) {
	rc, err := w.file.SyscallConn()
	if err != nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for wd, p := range w.dirs {
		if p == dir || strings.HasPrefix(p, dir+"/") {
			_ = rc.Control(func(fd uintptr) { _, _ = unix.InotifyRmWatch(int(fd), uint32(wd)) })
			delete(w.dirs, wd)
		}
	}
}

func (w *watcher) dir(wd int) (string, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	p, ok := w.dirs[wd]
	return p, ok
}

// run reads inotify events until the watcher is closed.
func (w *watcher) run() {
	defer close(w.events)
	buf := make([]byte, 64<<10)
	for {
		n, err := w.file.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				w.log.Warn("inotify read failed", "root", w.root, "err", err)
			}
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			raw := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameEnd := off + unix.SizeofInotifyEvent + int(raw.Len)
			if nameEnd > n {
				break
			}
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:nameEnd]), "\x00")
			off = nameEnd
			if !w.handle(int(raw.Wd), raw.Mask, name) {
				return
			}
		}
	}
}

// handle processes one inotify event; false means the watcher was closed.
func (w *watcher) handle(wd int, mask uint32, name string) bool {
	if mask&unix.IN_Q_OVERFLOW != 0 {
		w.log.Warn("inotify queue overflowed, events were lost", "root", w.root)
		return true
	}
	dir, ok := w.dir(wd)
	if !ok {
		return true
	}
	if mask&unix.IN_IGNORED != 0 {
		w.mu.Lock()
		delete(w.dirs, wd)
		w.mu.Unlock()
		return true
	}
	// A watched subdirectory reports its own deletion or move, and so does its
	// parent; keep only the parent's report. The root has no watched parent.
	if mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0 && dir != w.root {
		return true
	}
	full := dir
	if name != "" {
		full = filepath.Join(dir, name)
	}
	if w.recursive && mask&unix.IN_ISDIR != 0 {
		switch {
		case mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0:
			// Watch it before reporting it, so that a client reacting to the
			// event by writing into the new directory is seen.
			if err := w.add(full); err == nil {
				w.addTree(full)
			}
		case mask&unix.IN_MOVED_FROM != 0:
			w.forgetTree(full)
		}
	}
	rel, err := filepath.Rel(w.root, full)
	if err != nil {
		return true
	}
	for _, t := range eventTypes(mask) {
		ev := &pb.FilesystemEvent{Name: rel, Type: t}
		if w.includeEntry && t != pb.EventType_EVENT_TYPE_REMOVE && t != pb.EventType_EVENT_TYPE_RENAME {
			if e, err := stat(full, newNames()); err == nil {
				ev.Entry = e
			}
		}
		select {
		case w.events <- ev:
		case <-w.done:
			return false
		}
	}
	return true
}

// eventTypes maps an inotify mask to protocol events, in the order fsnotify-based
// envd reports them when one inotify event carries several.
func eventTypes(mask uint32) []pb.EventType {
	var out []pb.EventType
	if mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0 {
		out = append(out, pb.EventType_EVENT_TYPE_CREATE)
	}
	if mask&(unix.IN_MOVED_FROM|unix.IN_MOVE_SELF) != 0 {
		out = append(out, pb.EventType_EVENT_TYPE_RENAME)
	}
	if mask&unix.IN_ATTRIB != 0 {
		out = append(out, pb.EventType_EVENT_TYPE_CHMOD)
	}
	if mask&unix.IN_MODIFY != 0 {
		out = append(out, pb.EventType_EVENT_TYPE_WRITE)
	}
	if mask&(unix.IN_DELETE|unix.IN_DELETE_SELF) != 0 {
		out = append(out, pb.EventType_EVENT_TYPE_REMOVE)
	}
	return out
}

// Filesystem magic numbers of network and FUSE filesystems (linux/magic.h and the
// CIFS/SMB client sources). inotify sees only local changes on them, so watching
// needs an explicit opt-in.
const (
	nfsSuperMagic   = 0x6969
	cifsMagic       = 0xFF534D42
	smbSuperMagic   = 0x517B
	smb2MagicNumber = 0xFE534D42
	fuseSuperMagic  = 0x65735546
)

func onNetworkMount(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	switch uint32(st.Type) {
	case nfsSuperMagic, cifsMagic, smbSuperMagic, smb2MagicNumber, fuseSuperMagic:
		return true, nil
	}
	return false, nil
}
