package guestinit

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// EnvdPort is the TCP port envd serves on in the guest (runtime.EnvdPort;
// not imported, to keep the host's packages out of the guest's init).
const EnvdPort = 49983

// Ioctls of the random device (linux/random.h): RNDADDENTROPY is
// _IOW('R', 0x03, int[2]), RNDRESEEDCRNG is _IO('R', 0x07).
const (
	rndAddEntropy  = 0x40085203
	rndReseedCRNG  = 0x5207
	randomDevice   = "/dev/urandom"
	envdHealthPath = "/health"
)

// kernelSystem is the System of a running guest: the calls act on the
// kernel init runs on.
func kernelSystem(powerOff func()) *System {
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	url := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(EnvdPort)) + envdHealthPath
	return &System{
		SetClock: func(ns int64) error {
			ts := unix.NsecToTimespec(ns)
			return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
		},
		AddEntropy:  addEntropy,
		SetHostname: func(name string) error { return unix.Sethostname([]byte(name)) },
		Sync:        func() error { unix.Sync(); return nil },
		PowerOff:    powerOff,
		EnvdUp: func(ctx context.Context) bool {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			if err != nil {
				return false
			}
			resp, err := client.Do(req)
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode/100 == 2
		},
	}
}

// addEntropy mixes b into the kernel's entropy pool, crediting all its
// bits (the host's entropy is as good as the host's RNG), then makes the
// CRNG reseed from the pool at once instead of at its next scheduled
// reseed: the point is that a restored clone stops producing its
// template's stream now.
func addEntropy(b []byte) error {
	f, err := os.OpenFile(randomDevice, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(b))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(b)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(b)))
	copy(info[8:], b)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndAddEntropy, uintptr(unsafe.Pointer(&info[0]))); e != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndReseedCRNG, 0); e != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", e)
	}
	return nil
}

// powerOffTimeout is how long the other processes get between SIGTERM and
// SIGKILL when the VM powers off.
const powerOffTimeout = 2 * time.Second
