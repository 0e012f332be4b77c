package guestinit

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// listenVsock listens on the vsock port for connections from the host.
func listenVsock(port uint32) (int, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("vsock bind port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("vsock listen: %w", err)
	}
	return fd, nil
}

// serveVsock accepts the host's connections on the listening socket ln and
// serves the control protocol on each, one goroutine per connection.
func serveVsock(ctx context.Context, ln int, sys *System) {
	for ctx.Err() == nil {
		fd, _, err := unix.Accept4(ln, unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		if err != nil {
			if err != unix.EINTR && err != unix.ECONNABORTED {
				logf("control channel: accept: %v", err)
				time.Sleep(100 * time.Millisecond) // EMFILE and the like: do not spin
			}
			continue
		}
		// Non-blocking, so that the runtime's poller waits for it.
		conn := os.NewFile(uintptr(fd), "vsock")
		go func() {
			defer conn.Close()
			if err := sys.Serve(ctx, conn); err != nil {
				logf("control channel: %v", err)
			}
		}()
	}
}
