// Package pidfd waits for a process to end through its pidfd, parked in
// Go's netpoller rather than in a thread, so that any number of sandboxes
// can be watched, including ones this process did not start (a server
// restarted while its sandboxes ran on).
package pidfd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Wait blocks until the process behind f ends or ctx is done (ctx's
// error). f must wrap a pidfd opened with PIDFD_NONBLOCK, handed to
// os.NewFile, which registers it with the netpoller; the caller keeps
// owning f.
func Wait(ctx context.Context, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("pidfd: %w", err)
	}
	// A deadline in the past wakes the parked reader; one an earlier
	// Wait left behind must not end this one.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("pidfd: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		// A pidfd cannot be read; poll(2) without waiting says whether the
		// process ended. false parks the goroutine until it turns readable.
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, 0)
		if err != nil && !errors.Is(err, unix.EINTR) {
			perr = err
			return true
		}
		return n > 0 && p[0].Revents&(unix.POLLIN|unix.POLLHUP|unix.POLLERR) != 0
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return fmt.Errorf("pidfd: wait: %w", err)
	}
	if perr != nil {
		return fmt.Errorf("pidfd: poll: %w", perr)
	}
	return nil
}
