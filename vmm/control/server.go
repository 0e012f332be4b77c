//go:build linux && amd64

package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	vnet "github.com/cubicle-dev/cubicle/vmm/virtio/net"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// DefaultTimeout bounds an operation whose request sets no TimeoutMs.
const DefaultTimeout = 30 * time.Second

// ServerConfig configures a Server.
type ServerConfig struct {
	// KVM is the /dev/kvm handle every VM of this server uses.
	KVM *kvm.System
	// Console receives the guest's serial output unless a request names a
	// console file; nil discards it.
	Console io.Writer
	Logger  *slog.Logger
}

// Server holds at most one VM and serves requests for it. Requests are
// handled one at a time (Server.mu); the VM's own goroutines run
// alongside.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	mu       sync.Mutex // serialises requests; guards the fields below
	vm       *vmm.VM
	prepared *vmm.Prepared
	prepSnap Snapshot
	prepSt   *snapshot.State
	console  *os.File // the console file a request opened, if any
	stopped  bool
	// ln is the socket a listen request opened; finished is closed once
	// a detached server should exit (stop request, or its VM ended).
	ln       *net.UnixListener
	finished chan struct{}
	finish   sync.Once
}

// NewServer returns a server without a VM.
func NewServer(cfg ServerConfig) *Server {
	s := &Server{cfg: cfg, log: cfg.Logger, finished: make(chan struct{})}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s
}

// ServeConn answers requests on conn until the peer closes it, a stop
// request has been answered (then it returns nil) or ctx ends.
func (s *Server) ServeConn(ctx context.Context, conn *net.UnixConn) error {
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	r := &reader{conn: conn}
	for {
		line, files, err := r.next()
		if err != nil {
			if errors.Is(err, ErrClosed) || errors.Is(err, io.EOF) {
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		resp := s.handleLine(ctx, line, files)
		if err := writeMessage(conn, resp, nil); err != nil {
			return err
		}
		s.mu.Lock()
		stopped := s.stopped
		s.mu.Unlock()
		if stopped {
			return nil
		}
	}
}

// Serve accepts connections on ln and serves each (one at a time per
// connection, requests serialised across them) until a stop request or
// ctx ends.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			if err := s.ServeConn(ctx, c); err != nil {
				s.log.Warn("control connection", "err", err)
			}
			s.mu.Lock()
			stopped := s.stopped
			s.mu.Unlock()
			if stopped {
				cancel()
			}
		}()
	}
}

// Close stops and releases the VM and whatever was prepared.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.release()
}

func (s *Server) release() error {
	var errs []error
	if s.ln != nil {
		s.ln.Close()
	}
	if s.vm != nil {
		errs = append(errs, s.vm.Close())
		s.vm = nil
	}
	if s.prepared != nil {
		errs = append(errs, s.prepared.Close())
		s.prepared, s.prepSt = nil, nil
	}
	if s.console != nil {
		errs = append(errs, s.console.Close())
		s.console = nil
	}
	return errors.Join(errs...)
}

func (s *Server) handleLine(ctx context.Context, line []byte, files []*os.File) *Response {
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close() // descriptors a device took over were set to nil
			}
		}
	}()
	var req Request
	if err := json.Unmarshal(line, &req); err != nil {
		return fail(fmt.Errorf("%w: %w", ErrBadRequest, err))
	}
	timeout := DefaultTimeout
	if req.TimeoutMs > 0 {
		timeout = time.Duration(req.TimeoutMs) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	resp, err := s.handle(ctx, &req, files)
	if err != nil {
		s.log.Debug("request failed", "op", req.Op, "err", err)
		return fail(err)
	}
	resp.OK = true
	if req.Op == OpRestore || req.Op == OpConfigure {
		s.watchVM()
	}
	if s.vm != nil && resp.State == "" {
		resp.State = s.vm.State()
	}
	return resp
}

func fail(err error) *Response {
	return &Response{Error: err.Error(), Code: codeOf(err)}
}

// handle runs one request with s.mu held.
func (s *Server) handle(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
	if s.stopped {
		return nil, fmt.Errorf("%w: server stopped", vmm.ErrState)
	}
	needVM := func() error {
		if s.vm == nil {
			return fmt.Errorf("%w: %s without a VM (configure or restore first)", vmm.ErrState, req.Op)
		}
		return nil
	}
	switch req.Op {
	case OpConfigure:
		return &Response{}, s.configure(req, files)
	case OpStart:
		if err := needVM(); err != nil {
			return nil, err
		}
		if err := s.vm.Start(); err != nil {
			return nil, err
		}
		return &Response{}, s.waitRunning(ctx, req)
	case OpPause:
		if err := needVM(); err != nil {
			return nil, err
		}
		return &Response{}, s.vm.Pause(ctx)
	case OpResume:
		if err := needVM(); err != nil {
			return nil, err
		}
		return &Response{}, s.vm.Resume()
	case OpSnapshot:
		if err := needVM(); err != nil {
			return nil, err
		}
		if req.Snapshot == nil {
			return nil, fmt.Errorf("%w: snapshot needs file names", ErrBadRequest)
		}
		return &Response{}, s.vm.Snapshot(req.Snapshot.State, req.Snapshot.Memory)
	case OpPrepare:
		return &Response{State: "prepared"}, s.prepare(req)
	case OpRestore:
		return s.restore(ctx, req, files)
	case OpStop:
		s.stopped = true
		err := s.release()
		s.end()
		return &Response{State: "stopped"}, err
	case OpListen:
		return &Response{}, s.listen(req)
	case OpMetrics:
		return &Response{Metrics: s.metrics()}, nil
	case OpSerial:
		if err := needVM(); err != nil {
			return nil, err
		}
		return &Response{Accepted: s.vm.SerialInput([]byte(req.Serial))}, nil
	}
	return nil, fmt.Errorf("%w: unknown operation %q", ErrBadRequest, req.Op)
}

// vmConfig is the vmm.Config of this server's VMs.
func (s *Server) vmConfig(mem uint64, vcpus int) vmm.Config {
	return vmm.Config{MemoryBytes: mem, VCPUs: vcpus, Console: s.cfg.Console, Logger: s.log, KVM: s.cfg.KVM}
}

// setConsole points the VM's serial output at the request's console file,
// at most limit bytes of it when limit > 0.
func (s *Server) setConsole(path string, limit int64) error {
	if path == "" {
		return nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("%w: console: %w", ErrBadRequest, err)
	}
	if s.console != nil {
		s.console.Close()
	}
	s.console = f
	if limit > 0 {
		s.vm.SetConsole(&boundedWriter{w: f, left: limit})
	} else {
		s.vm.SetConsole(f)
	}
	return nil
}

// boundedWriter passes on at most left bytes and then drops the rest,
// noting once that it did. It never fails a write: the guest's serial
// port must not stall because its log is full.
type boundedWriter struct {
	mu   sync.Mutex
	w    io.Writer
	left int64
	cut  bool
}

func (b *boundedWriter) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.left <= 0 {
		if !b.cut {
			b.cut = true
			io.WriteString(b.w, "\n[cubicle: console log limit reached; further guest output dropped]\n")
		}
		return len(p), nil
	}
	q := p
	if int64(len(q)) > b.left {
		q = q[:b.left]
	}
	n, _ := b.w.Write(q)
	b.left -= int64(n)
	return len(p), nil
}

// listen serves further connections on req.Path and detaches the server
// from the connection that asked: see Client.Listen.
func (s *Server) listen(req *Request) error {
	if req.Path == "" {
		return fmt.Errorf("%w: listen needs a path", ErrBadRequest)
	}
	if s.ln != nil {
		return fmt.Errorf("%w: listening already", vmm.ErrState)
	}
	_ = os.Remove(req.Path) // a socket left by an earlier process
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: req.Path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("control: listen: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	s.ln = ln
	go func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if err := s.ServeConn(context.Background(), c); err != nil {
					s.log.Warn("control connection", "err", err)
				}
			}()
		}
	}()
	s.watchVM()
	return nil
}

// watchVM ends a detached server when its VM ends (a guest power-off or
// crash): the process exiting is how the runtime learns of it.
func (s *Server) watchVM() {
	if s.ln == nil || s.vm == nil {
		return
	}
	vm := s.vm
	go func() {
		<-vm.Done()
		s.end()
	}()
}

// end tells a detached server's Main to return.
func (s *Server) end() { s.finish.Do(func() { close(s.finished) }) }

// Detached reports whether a listen request detached the server.
func (s *Server) Detached() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ln != nil
}

// Finished is closed once a detached server is done: a stop request was
// answered or its VM ended.
func (s *Server) Finished() <-chan struct{} { return s.finished }

func (s *Server) configure(req *Request, files []*os.File) (err error) {
	m := req.Machine
	if m == nil {
		return fmt.Errorf("%w: configure needs a machine", ErrBadRequest)
	}
	if s.vm != nil {
		return fmt.Errorf("%w: a VM exists already", vmm.ErrState)
	}
	proto := boot.ProtocolLinux64
	switch m.Protocol {
	case "", "linux64":
	case "pvh":
		proto = boot.ProtocolPVH
	default:
		return fmt.Errorf("%w: boot protocol %q", ErrBadRequest, m.Protocol)
	}
	vm, err := vmm.New(s.vmConfig(m.MemoryMiB<<20, m.VCPUs))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	s.vm = vm
	defer func() {
		if err != nil {
			s.vm.Close()
			s.vm = nil
		}
	}()
	if err := s.setConsole(req.Console, req.ConsoleLimit); err != nil {
		return err
	}
	if err := s.addDevices(req.Devices, files); err != nil {
		return err
	}
	return vm.LoadKernelFile(m.Kernel, m.Cmdline, proto)
}

// prepare maps a template snapshot into a VM shell for a later restore.
func (s *Server) prepare(req *Request) error {
	if req.Snapshot == nil {
		return fmt.Errorf("%w: prepare needs file names", ErrBadRequest)
	}
	if s.vm != nil || s.prepared != nil {
		return fmt.Errorf("%w: a VM exists or is prepared already", vmm.ErrState)
	}
	st, err := snapshot.ReadFile(req.Snapshot.State)
	if err != nil {
		return err
	}
	p, err := vmm.Prepare(s.vmConfig(0, 0), req.Snapshot.Memory, st.MemSize, len(st.VCPUs))
	if err != nil {
		return err
	}
	s.prepared, s.prepSnap, s.prepSt = p, *req.Snapshot, st
	return nil
}

// restore turns a snapshot into a VM — the prepared one when it was
// prepared for these files — attaches the devices and starts it.
func (s *Server) restore(ctx context.Context, req *Request, files []*os.File) (_ *Response, err error) {
	if req.Snapshot == nil {
		return nil, fmt.Errorf("%w: restore needs file names", ErrBadRequest)
	}
	if s.vm != nil {
		return nil, fmt.Errorf("%w: a VM exists already", vmm.ErrState)
	}
	resp := &Response{}
	if s.prepared != nil && s.prepSnap == *req.Snapshot {
		p, st := s.prepared, s.prepSt
		s.prepared, s.prepSt = nil, nil
		vm, err := p.Restore(st)
		if err != nil {
			p.Close()
			return nil, err
		}
		s.vm, resp.Prepared = vm, true
	} else {
		st, err := snapshot.ReadFile(req.Snapshot.State)
		if err != nil {
			return nil, err
		}
		if s.vm, err = vmm.RestoreState(s.vmConfig(0, 0), st, req.Snapshot.Memory); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			s.vm.Close()
			s.vm = nil
		}
	}()
	if err := s.setConsole(req.Console, req.ConsoleLimit); err != nil {
		return nil, err
	}
	if err := s.addDevices(req.Devices, files); err != nil {
		return nil, err
	}
	if req.Paused {
		return resp, nil
	}
	if err := s.vm.Start(); err != nil {
		return nil, err
	}
	return resp, s.waitRunning(ctx, req)
}

// waitRunning waits, if asked, until a vCPU has run guest code.
func (s *Server) waitRunning(ctx context.Context, req *Request) error {
	if !req.WaitRunning {
		return nil
	}
	select {
	case <-s.vm.FirstExit():
		return nil
	case <-s.vm.Done():
		return fmt.Errorf("%w: VM stopped before running: %v", vmm.ErrState, s.vm.Wait(ctx))
	case <-ctx.Done():
		return fmt.Errorf("control: waiting for the guest to run: %w", ctx.Err())
	}
}

// addDevices adds the request's virtio devices to s.vm. A descriptor a
// device takes over is removed from files.
func (s *Server) addDevices(devs []Device, files []*os.File) error {
	take := func(d Device) (*os.File, error) {
		if d.FD == nil {
			return nil, nil
		}
		i := *d.FD
		if i < 0 || i >= len(files) || files[i] == nil {
			return nil, fmt.Errorf("%w: device %s: no descriptor %d", ErrBadRequest, d.Name, i)
		}
		f := files[i]
		files[i] = nil
		return f, nil
	}
	for _, d := range devs {
		f, err := take(d)
		if err != nil {
			return err
		}
		switch d.Kind {
		case KindBlock:
			_, err = s.vm.AddBlock(d.Name, blk.Config{Path: d.Path, File: f, ReadOnly: d.ReadOnly, Serial: d.Serial, Logger: s.log})
		case KindRNG:
			_, err = s.vm.AddRNG(d.Name, rng.Config{Logger: s.log})
		case KindVsock:
			_, err = s.vm.AddVsock(d.Name, vsock.Config{GuestCID: d.CID, UDSPath: d.UDS, Logger: s.log})
		case KindNet:
			var mac net.HardwareAddr
			if mac, err = net.ParseMAC(d.MAC); err != nil || len(mac) != 6 {
				return fmt.Errorf("%w: device %s: MAC %q", ErrBadRequest, d.Name, d.MAC)
			}
			cfg := vnet.Config{Tap: f, TapName: d.Tap, Logger: s.log}
			copy(cfg.MAC[:], mac)
			_, err = s.vm.AddNet(d.Name, cfg)
		default:
			if f != nil {
				f.Close()
			}
			return fmt.Errorf("%w: device %s: unknown kind %q", ErrBadRequest, d.Name, d.Kind)
		}
		if err != nil {
			return fmt.Errorf("device %s: %w", d.Name, err)
		}
	}
	return nil
}

// metrics describes the VM and its devices' counters.
func (s *Server) metrics() *Metrics {
	m := &Metrics{State: "none"}
	if s.prepared != nil {
		m.State = "prepared"
	}
	if s.vm == nil {
		return m
	}
	m.State = s.vm.State()
	m.MemoryBytes = s.vm.Memory().Size()
	m.VCPUs = s.vm.VCPUs()
	m.GuestMemoryAddr = uint64(s.vm.Memory().HostAddr(0))
	for _, d := range s.vm.VirtioDevices() {
		dm := DeviceMetrics{Name: d.Name(), Kind: kindOf(d)}
		switch dev := d.Device().(type) {
		case *blk.Device:
			dm.Counters = counters(dev.Metrics())
		case *rng.Device:
			dm.Counters = counters(dev.Metrics())
		case *vsock.Device:
			dm.Counters = counters(dev.Metrics())
		case *vnet.Device:
			dm.Counters = counters(dev.Metrics())
		}
		m.Devices = append(m.Devices, dm)
	}
	return m
}

func kindOf(d *vmm.VirtioDevice) string {
	switch d.Device().(type) {
	case *blk.Device:
		return KindBlock
	case *rng.Device:
		return KindRNG
	case *vsock.Device:
		return KindVsock
	case *vnet.Device:
		return KindNet
	}
	return d.Type().String()
}

// counters reads the atomic.Uint64 fields of a device's Metrics struct.
func counters(metrics any) map[string]uint64 {
	out := map[string]uint64{}
	v := reflect.ValueOf(metrics).Elem()
	for i := range v.NumField() {
		if c, ok := v.Field(i).Addr().Interface().(*atomic.Uint64); ok {
			out[v.Type().Field(i).Name] = c.Load()
		}
	}
	return out
}
