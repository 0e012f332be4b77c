package guestinit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Paths of the contract (package doc).
const (
	// Binary is the cubicle binary in the template image and in the sandbox.
	Binary = "/.cubicle/cubicle"
	// RWDir is where the sandbox disk is mounted before pivot_root.
	RWDir = "/.cubicle/rw"
	// RootDir is where the overlay is assembled before pivot_root.
	RootDir = "/.cubicle/root"
	// SandboxDisk is the writable sandbox disk.
	SandboxDisk = "/dev/vdb"
)

// nofile is the open-file limit of envd and all it starts, runtime/gvisor's.
const nofile = 1 << 20

// envdEnv is envd's environment, runtime/gvisor's.
var envdEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
}

// sandboxDiskWait bounds the wait for the sandbox disk to appear.
const sandboxDiskWait = 10 * time.Second

// console is where init logs: the kernel's console, init's stderr.
var console io.Writer = os.Stderr

func logf(format string, args ...any) {
	fmt.Fprintf(console, "cubicle-init: "+format+"\n", args...)
}

// Run is `cubicle init`. It returns only on an error before it could start
// (not PID 1); otherwise it ends by powering the VM off.
func Run() error {
	if os.Getpid() != 1 {
		return errors.New("cubicle init runs only as PID 1 of a microVM guest (the kernel's init=)")
	}
	// Go's runtime raised the soft limit; children inherit both.
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: nofile, Max: nofile}); err != nil {
		logf("RLIMIT_NOFILE %d: %v", nofile, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Signals first: a SIGTERM during setup powers off too.
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM, syscall.SIGINT)

	p, err := setup()
	if err != nil {
		logf("fatal: %v", err)
		powerOff(nil)
	}
	reaper := NewReaper()
	go reaper.Run(ctx)
	envdCtx, stopEnvd := context.WithCancel(ctx)
	go reaper.Supervise(envdCtx, Command{
		Path:   Binary,
		Args:   []string{Binary, "envd"},
		Env:    envdEnv,
		Dir:    "/",
		Stdout: os.Stderr,
		Stderr: os.Stderr,
	}, DefaultBackoff, console, func(pid int) { logf("envd started (pid %d)", pid) })

	var once sync.Once
	off := make(chan struct{})
	requestOff := func() { once.Do(func() { close(off) }) }
	sys := kernelSystem(requestOff)
	ln, err := listenVsock(ControlPort)
	if err != nil {
		logf("fatal: control channel: %v", err)
		stopEnvd()
		powerOff(reaper)
	}
	go serveVsock(ctx, ln, sys)
	logf("ready (hostname %s, memory %d MiB)", p.Hostname, p.MemoryMiB)
	select {
	case s := <-term:
		logf("%v: powering off", s)
	case <-off:
		logf("poweroff requested: powering off")
	}
	stopEnvd()
	powerOff(reaper)
	return nil
}

// setup does steps 1 to 6 of the package doc: everything before envd.
func setup() (Params, error) {
	if err := mountFS("proc", "/proc", "proc", 0, ""); err != nil {
		return Params{}, err
	}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return Params{}, err
	}
	p, err := ParseCmdline(string(b))
	if err != nil {
		return Params{}, err
	}
	if err := mountFS("devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"); err != nil {
		return Params{}, err
	}
	if err := overlayRoot(); err != nil {
		return Params{}, err
	}
	if err := mountSystem(p); err != nil {
		return Params{}, err
	}
	if err := SetupNetwork(p, GuestLink); err != nil {
		return Params{}, err
	}
	if p.Gateway.IsValid() {
		if err := writeResolvConf("/", p.Gateway); err != nil {
			return Params{}, fmt.Errorf("resolv.conf: %w", err)
		}
	}
	if err := unix.Sethostname([]byte(p.Hostname)); err != nil {
		return Params{}, fmt.Errorf("sethostname: %w", err)
	}
	return p, nil
}

// mountFS mounts, creating the mount point; a file system already mounted
// there (EBUSY: the kernel's devtmpfs) is kept.
func mountFS(source, target, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil && !errors.Is(err, unix.EROFS) {
		return fmt.Errorf("mount %s: %w", target, err)
	}
	if err := unix.Mount(source, target, fstype, flags, data); err != nil && err != unix.EBUSY {
		return fmt.Errorf("mount %s on %s: %w", fstype, target, err)
	}
	return nil
}

// overlayRoot makes the sandbox's root: the sandbox disk on RWDir, an
// overlay of the template (/) under it on RootDir, pivot_root into it, the
// old root detached, and the cubicle binary bound read-only on itself.
func overlayRoot() error {
	deadline := time.Now().Add(sandboxDiskWait)
	for {
		if _, err := os.Stat(SandboxDisk); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("no sandbox disk: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := unix.Mount(SandboxDisk, RWDir, "ext4", unix.MS_NOATIME, ""); err != nil {
		return fmt.Errorf("mount the sandbox disk %s on %s: %w", SandboxDisk, RWDir, err)
	}
	upper, work := filepath.Join(RWDir, "upper"), filepath.Join(RWDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("sandbox disk: %w", err)
		}
	}
	opts := "lowerdir=/,upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", RootDir, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay %s on %s: %w", opts, RootDir, err)
	}
	if err := unix.Chdir(RootDir); err != nil {
		return err
	}
	// pivot_root(".", "."): the old root ends up stacked on the new one,
	// and detaching "." drops it (runc does the same).
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root into %s: %w", RootDir, err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Mount(Binary, Binary, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", Binary, err)
	}
	if err := unix.Mount("", Binary, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("remount %s read-only: %w", Binary, err)
	}
	return nil
}

// mountSystem mounts step 4's file systems in the new root.
func mountSystem(p Params) error {
	shm := strconv.Itoa(max(p.MemoryMiB<<10/2, 1)) + "k"
	for _, m := range []struct {
		source, target, fstype string
		flags                  uintptr
		data                   string
	}{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777,size=" + shm},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	} {
		if err := mountFS(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
			return err
		}
	}
	// What udev would make: the /dev/fd family (bash's process
	// substitution, /dev/stdin in scripts).
	for name, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		if err := os.Symlink(target, name); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("symlink %s: %w", name, err)
		}
	}
	return nil
}

// powerOff ends the VM: every other process gets SIGTERM, then, after at
// most powerOffTimeout, SIGKILL; then sync and the reset that, with
// reboot=k, ends the VM. It does not return.
func powerOff(r *Reaper) {
	if unix.Kill(-1, unix.SIGTERM) == nil {
		deadline := time.Now().Add(powerOffTimeout)
		for time.Now().Before(deadline) {
			if r != nil {
				r.reap()
			}
			// kill(-1, 0) fails with ESRCH once no process but init is left.
			if unix.Kill(-1, 0) == unix.ESRCH {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		unix.Kill(-1, unix.SIGKILL)
	}
	unix.Sync()
	for {
		err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		logf("reboot: %v", err)
		time.Sleep(time.Second)
	}
}
