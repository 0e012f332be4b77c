//go:build linux && amd64

package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"time"
)

// Client sends requests to a VMM process. Its methods are safe for
// concurrent use; requests go one at a time.
type Client struct {
	mu   sync.Mutex
	conn *net.UnixConn
	r    *bufio.Reader
}

// Dial connects to a server listening on path.
func Dial(path string) (*Client, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	return NewClient(c), nil
}

// NewClient uses an established connection.
func NewClient(conn *net.UnixConn) *Client {
	return &Client{conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Do sends req with files attached and returns the response; a failed
// request is an *Error. ctx bounds the whole exchange.
func (c *Client) Do(ctx context.Context, req Request, files ...*os.File) (*Response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetDeadline(dl)
		if req.TimeoutMs == 0 {
			req.TimeoutMs = int(max(time.Until(dl).Milliseconds(), 1))
		}
	} else {
		c.conn.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	err := writeMessage(c.conn, req, files)
	runtime.KeepAlive(files)
	if err != nil {
		return nil, c.wrap(ctx, err)
	}
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("%w: response longer than %d bytes", ErrProtocol, c.r.Size())
		}
		return nil, c.wrap(ctx, err)
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	if !resp.OK {
		return &resp, &Error{Op: req.Op, Code: resp.Code, Message: resp.Error}
	}
	return &resp, nil
}

func (c *Client) wrap(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("control: %w", ctx.Err())
	}
	return fmt.Errorf("%w: %w", ErrClosed, err)
}

// Configure builds a VM with devs and boots m's kernel (not yet started).
func (c *Client) Configure(ctx context.Context, m Machine, devs []Device, console string, files ...*os.File) error {
	_, err := c.Do(ctx, Request{Op: OpConfigure, Machine: &m, Devices: devs, Console: console}, files...)
	return err
}

// Start runs the VM; with waitRunning it returns once a vCPU ran guest
// code.
func (c *Client) Start(ctx context.Context, waitRunning bool) error {
	_, err := c.Do(ctx, Request{Op: OpStart, WaitRunning: waitRunning})
	return err
}

// Pause stops the vCPUs and devices.
func (c *Client) Pause(ctx context.Context) error {
	_, err := c.Do(ctx, Request{Op: OpPause})
	return err
}

// Resume continues a paused VM.
func (c *Client) Resume(ctx context.Context) error {
	_, err := c.Do(ctx, Request{Op: OpResume})
	return err
}

// Snapshot saves a paused VM to the files.
func (c *Client) Snapshot(ctx context.Context, s Snapshot) error {
	_, err := c.Do(ctx, Request{Op: OpSnapshot, Snapshot: &s})
	return err
}

// Prepare maps the snapshot's memory file into a VM shell ahead of Restore.
func (c *Client) Prepare(ctx context.Context, s Snapshot) error {
	_, err := c.Do(ctx, Request{Op: OpPrepare, Snapshot: &s})
	return err
}

// RestoreOptions complete a restore request.
type RestoreOptions struct {
	Devices      []Device
	Console      string
	ConsoleLimit int64
	Paused       bool
	WaitRunning  bool
	Files        []*os.File // descriptors the devices refer to
}

// Restore turns the snapshot into a VM with o's devices and (unless
// o.Paused) starts it. It reports whether a prepared VM was used.
func (c *Client) Restore(ctx context.Context, s Snapshot, o RestoreOptions) (prepared bool, err error) {
	resp, err := c.Do(ctx, Request{Op: OpRestore, Snapshot: &s, Devices: o.Devices, Console: o.Console,
		ConsoleLimit: o.ConsoleLimit, Paused: o.Paused, WaitRunning: o.WaitRunning}, o.Files...)
	if err != nil {
		return false, err
	}
	return resp.Prepared, nil
}

// Stop stops the VM and the server.
func (c *Client) Stop(ctx context.Context) error {
	_, err := c.Do(ctx, Request{Op: OpStop})
	return err
}

// Metrics returns the VM's description and device counters.
func (c *Client) Metrics(ctx context.Context) (*Metrics, error) {
	resp, err := c.Do(ctx, Request{Op: OpMetrics})
	if err != nil {
		return nil, err
	}
	return resp.Metrics, nil
}

// Serial types s on the guest's COM1 and returns how many bytes its
// receive FIFO took.
func (c *Client) Serial(ctx context.Context, s string) (int, error) {
	resp, err := c.Do(ctx, Request{Op: OpSerial, Serial: s})
	if err != nil {
		return 0, err
	}
	return resp.Accepted, nil
}

// Listen detaches the VMM process from this connection: it serves further
// connections on the Unix socket path (as it sees it), no longer ends when
// this connection closes, and exits once its VM ends or a stop request
// comes. A runtime uses it so that VMs outlive the server that made them,
// which finds them again by the socket.
func (c *Client) Listen(ctx context.Context, path string) error {
	_, err := c.Do(ctx, Request{Op: OpListen, Path: path})
	return err
}
