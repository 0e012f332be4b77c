//go:build linux && amd64

// Package control runs one VM per process and steers it from outside: the
// server (Server, Main — what `cubicle vmm` runs) holds a vmm.VM and
// answers requests on a Unix socket; the client (Client) sends them;
// Spawn starts a VMM process (jailed or not) with a connected control
// socket, and Pool keeps idle VMM processes whose VM and memory slot for a
// template snapshot already exist, so that creating a sandbox pays neither
// for exec nor for the first memory slot.
//
// # Protocol
//
// Over a Unix stream socket, one JSON object per line in each direction:
// the client sends a Request and waits for its Response before sending the
// next. Descriptors a request refers to (a tap, an open disk image) ride
// along as SCM_RIGHTS on the request's first bytes and are numbered in
// the order sent (Device.FD). Operations: configure (build a VM and boot a
// kernel), start, pause, resume, snapshot, prepare (pool warm-up: map a
// template), restore (snapshot → running VM, devices attached), stop (the
// VM and the server), metrics, serial (input for the guest's COM1), listen
// (detach: serve further connections on a socket path, outlive the
// connection that asked, and exit when the VM ends). A
// failed request gets ok=false, a message and a code that the client turns
// back into the VMM's sentinel errors (see Error).
package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm"
)

// Operations.
const (
	OpConfigure = "configure"
	OpStart     = "start"
	OpPause     = "pause"
	OpResume    = "resume"
	OpSnapshot  = "snapshot"
	OpPrepare   = "prepare"
	OpRestore   = "restore"
	OpStop      = "stop"
	OpMetrics   = "metrics"
	OpSerial    = "serial"
	OpListen    = "listen"
)

// Limits of the protocol.
const (
	// MaxMessage bounds one request or response line.
	MaxMessage = 1 << 20
	// MaxFDs bounds the descriptors one request may carry.
	MaxFDs = 16
)

// Device kinds.
const (
	KindBlock = "blk"
	KindRNG   = "rng"
	KindVsock = "vsock"
	KindNet   = "net"
)

// Request is one operation.
type Request struct {
	Op string `json:"op"`
	// Machine describes the VM to build (configure).
	Machine *Machine `json:"machine,omitempty"`
	// Devices are the virtio devices (configure, restore), in the order
	// the guest numbers them; on restore, under their snapshot names.
	Devices []Device `json:"devices,omitempty"`
	// Snapshot names the files (snapshot, prepare, restore), as the VMM
	// process sees them.
	Snapshot *Snapshot `json:"snapshot,omitempty"`
	// Console is a file for the guest's serial output (configure,
	// restore); empty keeps the server's default.
	Console string `json:"console,omitempty"`
	// Serial is input for the guest's COM1 (serial).
	Serial string `json:"serial,omitempty"`
	// ConsoleLimit bounds how many bytes of guest output Console gets
	// (configure, restore); 0 is unbounded. Output past it is dropped, so
	// a guest flooding its serial console cannot fill the host's disk.
	ConsoleLimit int64 `json:"console_limit,omitempty"`
	// Path is the Unix socket to listen on (listen).
	Path string `json:"path,omitempty"`
	// Paused leaves a restored VM unstarted (restore).
	Paused bool `json:"paused,omitempty"`
	// WaitRunning makes start and restore answer only once a vCPU has run
	// guest code (vmm.VM.FirstExit), at most TimeoutMs later.
	WaitRunning bool `json:"wait_running,omitempty"`
	// TimeoutMs bounds the operation (0: DefaultTimeout).
	TimeoutMs int `json:"timeout_ms,omitempty"`
}

// Machine is a VM to boot.
type Machine struct {
	MemoryMiB uint64 `json:"memory_mib"`
	VCPUs     int    `json:"vcpus"`
	Kernel    string `json:"kernel"`
	Cmdline   string `json:"cmdline"`
	// Protocol is "linux64" (default) or "pvh".
	Protocol string `json:"protocol,omitempty"`
}

// Device is one virtio device.
type Device struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
	// Path is a blk device's disk image; FD, if set, indexes the request's
	// descriptors instead (blk: the open image; net: the tap).
	Path     string `json:"path,omitempty"`
	FD       *int   `json:"fd,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
	Serial   string `json:"serial,omitempty"`
	// CID and UDS configure a vsock device.
	CID uint64 `json:"cid,omitempty"`
	UDS string `json:"uds,omitempty"`
	// MAC is a net device's address, "02:00:00:00:00:01".
	MAC string `json:"mac,omitempty"`
	// Tap names a tap to open in the VMM's network namespace when no FD
	// is given.
	Tap string `json:"tap,omitempty"`
}

// Snapshot names a state file and a memory file.
type Snapshot struct {
	State  string `json:"state"`
	Memory string `json:"memory"`
}

// Response answers a Request.
type Response struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// Code classifies an error (see Error).
	Code string `json:"code,omitempty"`
	// State is the VM's state after the operation.
	State string `json:"state,omitempty"`
	// Accepted is how many serial bytes the guest's FIFO took (serial).
	Accepted int `json:"accepted,omitempty"`
	// Prepared reports that restore used the prepared VM.
	Prepared bool     `json:"prepared,omitempty"`
	Metrics  *Metrics `json:"metrics,omitempty"`
}

// Metrics describes the VM and its devices.
type Metrics struct {
	// State is "none" (no VM yet), "prepared" or the VM's state.
	State       string `json:"state"`
	MemoryBytes uint64 `json:"memory_bytes"`
	VCPUs       int    `json:"vcpus"`
	// GuestMemoryAddr is the host address where guest RAM is mapped in
	// the VMM process: its /proc/<pid>/smaps entry is guest memory, not
	// VMM overhead.
	GuestMemoryAddr uint64          `json:"guest_memory_addr"`
	Devices         []DeviceMetrics `json:"devices,omitempty"`
}

// DeviceMetrics are one device's counters.
type DeviceMetrics struct {
	Name     string            `json:"name"`
	Kind     string            `json:"kind"`
	Counters map[string]uint64 `json:"counters"`
}

// Error codes.
const (
	CodeState        = "state"        // wraps vmm.ErrState
	CodeIncompatible = "incompatible" // wraps vmm.ErrIncompatible
	CodeInvalid      = "invalid"      // wraps ErrBadRequest
	CodeInternal     = "internal"
)

var (
	// ErrBadRequest is returned for a request the server cannot parse or
	// that lacks what its operation needs.
	ErrBadRequest = errors.New("control: bad request")
	// ErrProtocol is returned when the other side breaks the framing
	// (oversized line, malformed JSON, too many descriptors).
	ErrProtocol = errors.New("control: protocol violation")
	// ErrClosed is returned by a client whose connection is gone.
	ErrClosed = errors.New("control: connection closed")
)

// Error is a failed request, as the client sees it. errors.Is matches
// vmm.ErrState, vmm.ErrIncompatible and ErrBadRequest by its code.
type Error struct {
	Op, Code, Message string
}

func (e *Error) Error() string { return fmt.Sprintf("control: %s: %s", e.Op, e.Message) }

// Is maps the code back to the sentinel errors.
func (e *Error) Is(target error) bool {
	switch e.Code {
	case CodeState:
		return target == vmm.ErrState
	case CodeIncompatible:
		return target == vmm.ErrIncompatible
	case CodeInvalid:
		return target == ErrBadRequest
	}
	return false
}

// codeOf classifies a server-side error.
func codeOf(err error) string {
	switch {
	case errors.Is(err, vmm.ErrState):
		return CodeState
	case errors.Is(err, vmm.ErrIncompatible):
		return CodeIncompatible
	case errors.Is(err, ErrBadRequest):
		return CodeInvalid
	}
	return CodeInternal
}

// reader reads newline-framed messages and the descriptors that come with
// them from a Unix socket.
type reader struct {
	conn *net.UnixConn
	buf  []byte // bytes read but not yet returned
	fds  []int  // descriptors received with them
}

// next returns the next line (without the newline) and the descriptors
// that arrived since the previous line. The caller owns the descriptors.
func (r *reader) next() ([]byte, []*os.File, error) {
	chunk := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(MaxFDs*4))
	for {
		if i := bytes.IndexByte(r.buf, '\n'); i >= 0 {
			line := r.buf[:i]
			r.buf = r.buf[i+1:]
			files := make([]*os.File, len(r.fds))
			for j, fd := range r.fds {
				files[j] = os.NewFile(uintptr(fd), fmt.Sprintf("fd%d", j))
			}
			r.fds = nil
			return line, files, nil
		}
		if len(r.buf) > MaxMessage {
			r.closeFDs()
			return nil, nil, fmt.Errorf("%w: message longer than %d bytes", ErrProtocol, MaxMessage)
		}
		n, oobn, flags, _, err := r.conn.ReadMsgUnix(chunk, oob)
		if oobn > 0 {
			if perr := r.takeFDs(oob[:oobn]); perr != nil && err == nil {
				err = perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 && err == nil {
			err = fmt.Errorf("%w: more than %d descriptors", ErrProtocol, MaxFDs)
		}
		r.buf = append(r.buf, chunk[:n]...)
		if err != nil {
			r.closeFDs()
			return nil, nil, err
		}
		if n == 0 {
			r.closeFDs()
			return nil, nil, ErrClosed
		}
	}
}

func (r *reader) takeFDs(oob []byte) error {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue // not SCM_RIGHTS
		}
		r.fds = append(r.fds, fds...)
	}
	if len(r.fds) > MaxFDs {
		return fmt.Errorf("%w: more than %d descriptors", ErrProtocol, MaxFDs)
	}
	return nil
}

func (r *reader) closeFDs() {
	for _, fd := range r.fds {
		unix.Close(fd)
	}
	r.fds = nil
}

// writeMessage sends v as one JSON line, with files as SCM_RIGHTS.
func writeMessage(conn *net.UnixConn, v any, files []*os.File) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if len(b) > MaxMessage {
		return fmt.Errorf("%w: message of %d bytes", ErrProtocol, len(b))
	}
	var oob []byte
	if len(files) > 0 {
		if len(files) > MaxFDs {
			return fmt.Errorf("%w: %d descriptors, at most %d", ErrProtocol, len(files), MaxFDs)
		}
		fds := make([]int, len(files))
		for i, f := range files {
			// Control, unlike Fd, leaves the descriptor's non-blocking
			// mode alone (a tap's description is shared with the VMM).
			rc, err := f.SyscallConn()
			if err != nil {
				return err
			}
			if err := rc.Control(func(fd uintptr) { fds[i] = int(fd) }); err != nil {
				return err
			}
		}
		oob = unix.UnixRights(fds...)
	}
	for len(b) > 0 {
		n, _, err := conn.WriteMsgUnix(b, oob, nil)
		if err != nil {
			return err
		}
		b, oob = b[n:], nil
	}
	return nil
}
