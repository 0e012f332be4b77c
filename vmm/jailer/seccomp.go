//go:build linux && amd64

package jailer

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrSeccomp is wrapped by errors installing the seccomp filter.
var ErrSeccomp = errors.New("jailer: seccomp filter")

// struct seccomp_data offsets (include/uapi/linux/seccomp.h): int nr, __u32
// arch, __u64 instruction_pointer, __u64 args[6]. Arguments are read as
// their low 32 bits (little endian).
const (
	offNr   = 0
	offArch = 4
	offArgs = 16
)

// x32Bit marks x32 system call numbers (__X32_SYSCALL_BIT,
// arch/x86/include/uapi/asm/unistd.h); the filter refuses them.
const x32Bit = 0x40000000

// Classic BPF opcodes (include/uapi/linux/filter.h and bpf_common.h).
const (
	bpfLdWAbs = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
	bpfJeqK   = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
	bpfJgeK   = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
	bpfJsetK  = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
	bpfRetK   = unix.BPF_RET | unix.BPF_K
	bpfAluAnd = unix.BPF_ALU | unix.BPF_AND | unix.BPF_K
	// maxJump is the farthest a conditional jump reaches (8-bit jt/jf).
	maxJump = 255
)

// argRule restricts one argument (its low 32 bits) of an allowed call.
type argRule struct {
	arg int
	// eq: the argument must equal val. Otherwise the bits in mask must all
	// be set.
	eq   bool
	val  uint32
	mask uint32
}

// rule is one system call the VMM may make.
type rule struct {
	nr   int
	args []argRule // all must hold; none: always allowed
	// errno, when non-zero, answers the call with that error instead of
	// allowing it (for calls a library tries and falls back from).
	errno unix.Errno
}

// threadFlags are the clone flags every thread creation carries — the Go
// runtime's (runtime/os_linux.go cloneFlags) and glibc's pthread_create;
// a fork lacks CLONE_THREAD and CLONE_VM.
const threadFlags = unix.CLONE_VM | unix.CLONE_THREAD

// rules is the allow-list of the jailed VMM process once it serves:
// what the Go runtime (threads, memory, signals, timers, the network
// poller), glibc's thread start when the binary links cgo, the KVM and
// device ioctls, guest-memory and snapshot files, the disk (preadv,
// pwritev, fdatasync), the tap (readv, writev), the vsock device's Unix
// sockets and the control socket need. Sockets are Unix sockets only;
// clone must create a thread. Everything else kills the process.
func rules() []rule {
	allow := func(nrs ...int) []rule {
		out := make([]rule, len(nrs))
		for i, nr := range nrs {
			out[i] = rule{nr: nr}
		}
		return out
	}
	r := allow(
		// runtime: memory, threads, scheduling, signals
		unix.SYS_MMAP, unix.SYS_MUNMAP, unix.SYS_MPROTECT, unix.SYS_MADVISE, unix.SYS_MREMAP,
		unix.SYS_FUTEX, unix.SYS_SCHED_YIELD, unix.SYS_NANOSLEEP, unix.SYS_CLOCK_GETTIME,
		unix.SYS_CLOCK_NANOSLEEP, unix.SYS_GETTID, unix.SYS_GETPID, unix.SYS_TGKILL,
		unix.SYS_RT_SIGACTION, unix.SYS_RT_SIGPROCMASK, unix.SYS_RT_SIGRETURN, unix.SYS_SIGALTSTACK,
		unix.SYS_RESTART_SYSCALL, unix.SYS_EXIT, unix.SYS_EXIT_GROUP, unix.SYS_GETRANDOM,
		unix.SYS_SCHED_GETAFFINITY, unix.SYS_SET_ROBUST_LIST, unix.SYS_RSEQ, unix.SYS_UNAME,
		unix.SYS_GETUID, unix.SYS_GETEUID, unix.SYS_GETGID, unix.SYS_GETEGID,
		unix.SYS_TIMER_CREATE, unix.SYS_TIMER_SETTIME, unix.SYS_TIMER_DELETE, unix.SYS_SETITIMER,
		// descriptors, the network poller, eventfds
		unix.SYS_READ, unix.SYS_WRITE, unix.SYS_READV, unix.SYS_WRITEV, unix.SYS_CLOSE,
		unix.SYS_PREAD64, unix.SYS_PWRITE64, unix.SYS_PREADV, unix.SYS_PWRITEV, unix.SYS_LSEEK,
		unix.SYS_FCNTL, unix.SYS_IOCTL, unix.SYS_EVENTFD2, unix.SYS_PIPE2,
		unix.SYS_EPOLL_CREATE1, unix.SYS_EPOLL_CTL, unix.SYS_EPOLL_WAIT, unix.SYS_EPOLL_PWAIT,
		// files inside the jail: snapshots, disks, consoles
		unix.SYS_OPENAT, unix.SYS_FSTAT, unix.SYS_NEWFSTATAT, unix.SYS_FTRUNCATE, unix.SYS_FSYNC,
		unix.SYS_FDATASYNC, unix.SYS_RENAMEAT, unix.SYS_RENAMEAT2, unix.SYS_UNLINKAT, unix.SYS_MKDIRAT,
		unix.SYS_GETDENTS64,
		// Unix sockets: the control socket and the vsock device
		unix.SYS_BIND, unix.SYS_LISTEN, unix.SYS_ACCEPT4, unix.SYS_CONNECT, unix.SYS_SHUTDOWN,
		unix.SYS_GETSOCKNAME, unix.SYS_GETPEERNAME, unix.SYS_GETSOCKOPT, unix.SYS_SETSOCKOPT,
		unix.SYS_RECVFROM, unix.SYS_SENDTO, unix.SYS_RECVMSG, unix.SYS_SENDMSG,
	)
	return append(r,
		rule{nr: unix.SYS_SOCKET, args: []argRule{{arg: 0, eq: true, val: unix.AF_UNIX}}},
		rule{nr: unix.SYS_CLONE, args: []argRule{{arg: 0, mask: threadFlags}}},
		// glibc tries clone3 first and falls back to clone on ENOSYS;
		// clone3's flags live in memory, out of the filter's reach.
		rule{nr: unix.SYS_CLONE3, errno: unix.ENOSYS},
	)
}

// filter assembles the classic BPF program for rules: check the
// architecture, refuse x32 numbers, then one comparison per rule.
func filter(rs []rule) ([]unix.SockFilter, error) {
	kill := uint32(unix.SECCOMP_RET_KILL_PROCESS)
	allow := uint32(unix.SECCOMP_RET_ALLOW)
	stmt := func(code uint16, k uint32) unix.SockFilter { return unix.SockFilter{Code: code, K: k} }
	jump := func(code uint16, k uint32, jt, jf uint8) unix.SockFilter {
		return unix.SockFilter{Code: code, Jt: jt, Jf: jf, K: k}
	}
	p := []unix.SockFilter{
		stmt(bpfLdWAbs, offArch),
		jump(bpfJeqK, unix.AUDIT_ARCH_X86_64, 1, 0),
		stmt(bpfRetK, kill),
		stmt(bpfLdWAbs, offNr),
		jump(bpfJgeK, x32Bit, 0, 1),
		stmt(bpfRetK, kill),
	}
	for _, r := range rs {
		// The rule's body: argument checks, each failing to kill, then
		// the verdict. A = nr on entry.
		var body []unix.SockFilter
		for _, a := range r.args {
			body = append(body, stmt(bpfLdWAbs, uint32(offArgs+8*a.arg)))
			if a.eq {
				body = append(body, jump(bpfJeqK, a.val, 1, 0), stmt(bpfRetK, kill))
			} else {
				body = append(body, stmt(bpfAluAnd, a.mask), jump(bpfJeqK, a.mask, 1, 0), stmt(bpfRetK, kill))
			}
		}
		verdict := allow
		if r.errno != 0 {
			verdict = unix.SECCOMP_RET_ERRNO | uint32(r.errno)
		}
		body = append(body, stmt(bpfRetK, verdict))
		if len(body) > maxJump {
			return nil, fmt.Errorf("%w: rule for syscall %d too long", ErrSeccomp, r.nr)
		}
		// Skip the body unless nr matches. The body ends in a return, so
		// falling through it is impossible.
		p = append(p, jump(bpfJeqK, uint32(r.nr), 0, uint8(len(body))))
		p = append(p, body...)
	}
	p = append(p, stmt(bpfRetK, kill))
	if len(p) > unix.BPF_MAXINSNS {
		return nil, fmt.Errorf("%w: %d instructions, the kernel takes %d", ErrSeccomp, len(p), unix.BPF_MAXINSNS)
	}
	return p, nil
}

// installSeccomp sets no_new_privs and installs the filter on every
// thread of the process (SECCOMP_FILTER_FLAG_TSYNC, which also gives the
// other threads no_new_privs).
func installSeccomp() error {
	prog, err := filter(rules())
	if err != nil {
		return err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("%w: PR_SET_NO_NEW_PRIVS: %w", ErrSeccomp, err)
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER,
		unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	runtime.KeepAlive(prog)
	if errno != 0 {
		return fmt.Errorf("%w: seccomp(SECCOMP_SET_MODE_FILTER): %w", ErrSeccomp, errno)
	}
	if r != 0 {
		return fmt.Errorf("%w: thread %d could not be synchronised", ErrSeccomp, r)
	}
	return nil
}
