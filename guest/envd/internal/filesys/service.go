// Package filesys implements envd's Filesystem RPC service: stat, list, create,
// move and remove entries as a sandbox user, and watch directories through inotify,
// either as a stream or as a watcher polled for buffered events.
package filesys

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem/filesystemconnect"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/defaults"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/fsutil"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/identity"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/keepalive"
)

// maxPolledEvents bounds what a polled watcher buffers between GetWatcherEvents
// calls; beyond it the oldest events are dropped.
const maxPolledEvents = 10000

// Service serves filesystem.Filesystem.
type Service struct {
	filesystemconnect.UnimplementedFilesystemHandler

	log      *slog.Logger
	defaults *defaults.Store
	chown    bool // envd runs as root: give what it creates to the requesting user

	mu       sync.Mutex              // guards watchers
	watchers map[string]*polledWatch // CreateWatcher watchers by id
}

var _ filesystemconnect.FilesystemHandler = (*Service)(nil)

// polledWatch is a watcher whose events wait in memory for GetWatcherEvents.
type polledWatch struct {
	w *watcher

	mu      sync.Mutex // guards events and dropped
	events  []*pb.FilesystemEvent
	dropped int
}

// New returns a Service that takes users and workdir from d.
func New(log *slog.Logger, d *defaults.Store) *Service {
	return &Service{log: log, defaults: d, chown: os.Geteuid() == 0, watchers: map[string]*polledWatch{}}
}

// Close stops every polled watcher.
func (s *Service) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, pw := range s.watchers {
		pw.w.close()
		delete(s.watchers, id)
	}
}

// Stat describes one entry; a final symlink is not followed.
func (s *Service) Stat(_ context.Context, req *connect.Request[pb.StatRequest]) (*connect.Response[pb.StatResponse], error) {
	_, path, err := s.resolve(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	e, err := stat(path, newNames())
	if err != nil {
		return nil, fsError(err, path)
	}
	return connect.NewResponse(&pb.StatResponse{Entry: e}), nil
}

// MakeDir creates a directory and any missing parents, owned by the user.
func (s *Service) MakeDir(_ context.Context, req *connect.Request[pb.MakeDirRequest]) (*connect.Response[pb.MakeDirResponse], error) {
	u, path, err := s.resolve(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	if fi, err := os.Stat(path); err == nil {
		if fi.IsDir() {
			return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("directory '%s' already exists", path))
		}
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' already exists and is not a directory", path))
	}
	if err := fsutil.MkdirAllOwned(path, int(u.UID), int(u.GID), s.chown); err != nil {
		return nil, fsError(err, path)
	}
	e, err := stat(path, newNames())
	if err != nil {
		return nil, fsError(err, path)
	}
	return connect.NewResponse(&pb.MakeDirResponse{Entry: e}), nil
}

// Move renames an entry, creating the destination's parent directories.
func (s *Service) Move(_ context.Context, req *connect.Request[pb.MoveRequest]) (*connect.Response[pb.MoveResponse], error) {
	u, src, err := s.resolve(req.Header(), req.Msg.GetSource())
	if err != nil {
		return nil, err
	}
	dst, err := s.defaults.Resolve(req.Msg.GetDestination(), u)
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	if _, err := os.Lstat(src); err != nil {
		return nil, fsError(err, src)
	}
	if err := fsutil.MkdirAllOwned(filepath.Dir(dst), int(u.UID), int(u.GID), s.chown); err != nil {
		return nil, fsError(err, filepath.Dir(dst))
	}
	if err := os.Rename(src, dst); err != nil {
		return nil, fsError(err, src)
	}
	e, err := stat(dst, newNames())
	if err != nil {
		return nil, fsError(err, dst)
	}
	return connect.NewResponse(&pb.MoveResponse{Entry: e}), nil
}

// ListDir lists a directory down to depth levels (0 counts as 1). The directory
// itself may be a symlink; links below it are listed, not followed.
func (s *Service) ListDir(_ context.Context, req *connect.Request[pb.ListDirRequest]) (*connect.Response[pb.ListDirResponse], error) {
	_, path, err := s.resolve(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	depth := int(max(req.Msg.GetDepth(), 1))
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fsError(err, path)
	}
	fi, err := os.Stat(real)
	if err != nil {
		return nil, fsError(err, path)
	}
	if !fi.IsDir() {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' is not a directory", path))
	}
	n := newNames()
	entries := []*pb.EntryInfo{}
	err = filepath.WalkDir(real, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == real {
				return err
			}
			// An unreadable or vanished subdirectory should not fail the listing.
			if d != nil && d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if p == real {
			return nil
		}
		rel, _ := filepath.Rel(real, p)
		if strings.Count(rel, string(filepath.Separator))+1 > depth {
			return fs.SkipDir
		}
		info, err := d.Info()
		if err != nil {
			return nil // vanished between readdir and lstat
		}
		entries = append(entries, entry(filepath.Join(path, rel), info, n))
		return nil
	})
	if err != nil {
		return nil, fsError(err, path)
	}
	return connect.NewResponse(&pb.ListDirResponse{Entries: entries}), nil
}

// Remove deletes an entry, recursively. Removing what does not exist succeeds, as
// in E2B's envd (the SDK's tests rely on it).
func (s *Service) Remove(_ context.Context, req *connect.Request[pb.RemoveRequest]) (*connect.Response[pb.RemoveResponse], error) {
	_, path, err := s.resolve(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	if err := os.RemoveAll(path); err != nil {
		return nil, fsError(err, path)
	}
	return connect.NewResponse(&pb.RemoveResponse{}), nil
}

// WatchDir streams filesystem events under a directory: a start event once the
// watch is in place, then events, with keepalives while idle.
func (s *Service) WatchDir(ctx context.Context, req *connect.Request[pb.WatchDirRequest], stream *connect.ServerStream[pb.WatchDirResponse]) error {
	m := req.Msg
	w, err := s.watch(req.Header(), m.GetPath(), m.GetRecursive(), m.GetIncludeEntry(), m.GetAllowNetworkMounts())
	if err != nil {
		return err
	}
	defer w.close()
	if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Start{Start: &pb.WatchDirResponse_StartEvent{}}}); err != nil {
		return err
	}
	var tick <-chan time.Time
	var timer *time.Timer
	period := keepalive.Period(req.Header())
	if period > 0 {
		timer = time.NewTimer(period)
		defer timer.Stop()
		tick = timer.C
	}
	for {
		var resp *pb.WatchDirResponse
		select {
		case ev, ok := <-w.events:
			if !ok {
				return connect.NewError(connect.CodeInternal, errors.New("watcher stopped"))
			}
			resp = &pb.WatchDirResponse{Event: &pb.WatchDirResponse_Filesystem{Filesystem: ev}}
		case <-tick:
			resp = &pb.WatchDirResponse{Event: &pb.WatchDirResponse_Keepalive{Keepalive: &pb.WatchDirResponse_KeepAlive{}}}
		case <-ctx.Done():
			return ctx.Err()
		}
		if timer != nil {
			timer.Reset(period)
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

// CreateWatcher starts a watcher whose events are fetched with GetWatcherEvents.
func (s *Service) CreateWatcher(_ context.Context, req *connect.Request[pb.CreateWatcherRequest]) (*connect.Response[pb.CreateWatcherResponse], error) {
	m := req.Msg
	w, err := s.watch(req.Header(), m.GetPath(), m.GetRecursive(), m.GetIncludeEntry(), m.GetAllowNetworkMounts())
	if err != nil {
		return nil, err
	}
	var idBytes [16]byte
	_, _ = rand.Read(idBytes[:]) // crypto/rand.Read never fails on Linux
	id := hex.EncodeToString(idBytes[:])
	pw := &polledWatch{w: w}
	s.mu.Lock()
	s.watchers[id] = pw
	s.mu.Unlock()
	go pw.collect(s.log)
	return connect.NewResponse(&pb.CreateWatcherResponse{WatcherId: id}), nil
}

// GetWatcherEvents returns and forgets the events a watcher collected.
func (s *Service) GetWatcherEvents(_ context.Context, req *connect.Request[pb.GetWatcherEventsRequest]) (*connect.Response[pb.GetWatcherEventsResponse], error) {
	s.mu.Lock()
	pw, ok := s.watchers[req.Msg.GetWatcherId()]
	s.mu.Unlock()
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("watcher '%s' not found", req.Msg.GetWatcherId()))
	}
	pw.mu.Lock()
	events := pw.events
	pw.events = nil
	pw.mu.Unlock()
	if events == nil {
		events = []*pb.FilesystemEvent{}
	}
	return connect.NewResponse(&pb.GetWatcherEventsResponse{Events: events}), nil
}

// RemoveWatcher stops a watcher.
func (s *Service) RemoveWatcher(_ context.Context, req *connect.Request[pb.RemoveWatcherRequest]) (*connect.Response[pb.RemoveWatcherResponse], error) {
	s.mu.Lock()
	pw, ok := s.watchers[req.Msg.GetWatcherId()]
	delete(s.watchers, req.Msg.GetWatcherId())
	s.mu.Unlock()
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("watcher '%s' not found", req.Msg.GetWatcherId()))
	}
	pw.w.close()
	return connect.NewResponse(&pb.RemoveWatcherResponse{}), nil
}

// collect moves events from the watcher into the poll buffer until it stops.
func (pw *polledWatch) collect(log *slog.Logger) {
	for ev := range pw.w.events {
		pw.mu.Lock()
		if len(pw.events) >= maxPolledEvents {
			pw.events = pw.events[1:]
			pw.dropped++
			if pw.dropped == 1 || pw.dropped%maxPolledEvents == 0 {
				log.Warn("polled watcher is not being read; dropping its oldest events", "root", pw.w.root, "dropped", pw.dropped)
			}
		}
		pw.events = append(pw.events, ev)
		pw.mu.Unlock()
	}
}

// watch validates a watch request and starts the watcher.
func (s *Service) watch(h http.Header, p string, recursive, includeEntry, allowNetwork bool) (*watcher, error) {
	_, path, err := s.resolve(h, p)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fsError(err, path)
	}
	if !fi.IsDir() {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' is not a directory", path))
	}
	if !allowNetwork {
		if network, err := onNetworkMount(path); err == nil && network {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' is on a network filesystem; set allow_network_mounts to watch it", path))
		}
	}
	w, err := newWatcher(s.log, path, recursive, includeEntry)
	if err != nil {
		return nil, fsError(err, path)
	}
	return w, nil
}

// resolve finds the request's user and resolves p for it.
func (s *Service) resolve(h http.Header, p string) (*identity.User, string, error) {
	u, err := s.defaults.User(h, "")
	if err != nil {
		return nil, "", connect.NewError(connect.CodeUnauthenticated, err)
	}
	path, err := s.defaults.Resolve(p, u)
	if err != nil {
		return nil, "", connect.NewError(connect.CodeInvalidArgument, err)
	}
	return u, path, nil
}

// fsError maps a filesystem failure to the connect code the SDK branches on.
func fsError(err error, path string) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("path '%s' does not exist: %w", path, err))
	case errors.Is(err, fs.ErrExist):
		return connect.NewError(connect.CodeAlreadyExists, err)
	case errors.Is(err, fs.ErrPermission):
		return connect.NewError(connect.CodePermissionDenied, err)
	case errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.ENAMETOOLONG), errors.Is(err, unix.ELOOP),
		errors.Is(err, identity.ErrInvalidPath):
		return connect.NewError(connect.CodeInvalidArgument, err)
	}
	return connect.NewError(connect.CodeInternal, err)
}
