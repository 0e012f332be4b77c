// Package guestinit (directory guest/init; "init" cannot name a Go
// package) is `cubicle init`: PID 1 of a microVM sandbox's Linux guest.
// This comment is the contract between the host side (runtime/microvm, the
// template's ext4 image and snapshot) and the guest side (this package, the
// guest kernel config in vmm/linux/config). Change it here first.
//
// # Template disk: read-only, virtio-blk device 0, /dev/vda
//
// An ext4 image made by template.Ext4Image with `mkfs.ext4 -d <rootfs>` (no
// loop mount; root is needed only to read a root-owned rootfs), sized to its
// content plus headroom and cached beside the template by a key of its
// inputs (the template's build ID, the hash of the cubicle binary put in it,
// the image layout version). Besides the template's rootfs it holds:
//
//	/.cubicle/cubicle   the static cubicle binary (mode 0755, root:root)
//	/.cubicle/rw        empty: the sandbox disk is mounted here
//	/.cubicle/root      empty: the overlay is assembled here
//	/proc /sys /dev /tmp   mount points (created when the rootfs lacks them)
//
// The VMM attaches it read-only; every sandbox of a template shares the file.
//
// # Sandbox disk: writable, virtio-blk device 1, /dev/vdb
//
// A per-sandbox ext4 filesystem whose size is the sandbox's disk limit,
// formatted by the host (or copied sparsely / reflinked from a formatted
// one, as runtime/gvisor's disk.go does). It may be empty: init creates
// upper/ and work/ at its root when they are missing. The whole device is
// the filesystem (no partition table). It is required: without /dev/vdb
// init stops the VM (see Failure).
//
// # Kernel command line
//
//	console=ttyS0 reboot=k panic=1 root=/dev/vda ro rootfstype=ext4
//	init=/.cubicle/cubicle cubicle.ip=169.254.0.21/30 cubicle.gw=169.254.0.22
//	cubicle.mem=<MiB> [cubicle.hostname=<name>] [virtio_mmio.device=... the VMM adds] -- init
//
// (No pci=off: the kernel has no PCI, so it would not know the parameter
// and would pass it to init's environment.)
//
// The kernel runs /.cubicle/cubicle with argv[1] == "init" (the word after
// "--"); `cubicle init` refuses to run unless it is PID 1. The VMM
// (vmm.VM.LoadKernel) puts the virtio_mmio.device= parameters of the
// devices it adds before the "--", where the kernel still reads them.
// Add the devices in the order template disk, sandbox disk (so they are
// vda and vdb), then net, vsock, rng. It reads its own
// parameters from /proc/cmdline (ParseCmdline), which it treats as untrusted
// input: an unknown cubicle.* key or a malformed value is an error.
//
//	cubicle.ip        address/prefix of eth0 (IPv4); absent: no eth0 setup, lo only
//	cubicle.gw        default gateway and the only nameserver; requires cubicle.ip,
//	                  must lie inside its prefix
//	cubicle.mem       guest memory in MiB (required): /dev/shm is sized to half
//	cubicle.hostname  hostname until the host's identity request sets another;
//	                  default "sandbox"
//
// network's tap mode gives every VM the same in-guest address
// (network.GuestAddr 169.254.0.21 in network.GuestSubnet 169.254.0.20/30,
// gateway network.GuestGateway 169.254.0.22), so one snapshot restores into
// any sandbox's network namespace.
//
// # What init does, in order
//
//  1. Set RLIMIT_NOFILE to 1<<20 (inherited by envd and all it starts);
//     parse /proc/cmdline (after mounting /proc on the read-only root).
//  2. Mount devtmpfs on /dev (unless the kernel did), the sandbox disk
//     /dev/vdb (ext4, noatime; waiting up to 10 s for it to appear) on
//     /.cubicle/rw, create upper/ and work/ there, and
//     mount an overlay lowerdir=/ (the template), upperdir=/.cubicle/rw/upper,
//     workdir=/.cubicle/rw/work on /.cubicle/root.
//  3. pivot_root into the overlay and detach the old root: the sandbox sees
//     one writable / whose free space is the sandbox disk's; /.cubicle/rw
//     and the template disk are not reachable from inside.
//     /.cubicle/cubicle is bind-mounted read-only onto itself, so a
//     sandbox cannot replace the binary init restarts envd from.
//  4. Mount, in the new root: /proc (proc), /sys (sysfs), /dev (devtmpfs,
//     whose /dev/ptmx opens the devpts instance beside it), /dev/pts
//     (devpts, newinstance, ptmxmode=0666, mode=0620, gid=5), /dev/shm
//     (tmpfs, mode 1777, size half of cubicle.mem), /sys/fs/cgroup
//     (cgroup2); symlink /dev/fd, /dev/stdin, /dev/stdout, /dev/stderr into
//     /proc/self/fd. /tmp and /run stay on the sandbox disk, as in gVisor
//     sandboxes (and /tmp in E2B's).
//  5. Network, over netlink: lo up; with cubicle.ip, eth0 gets it, comes
//     up, and gets the default route via cubicle.gw. /etc/resolv.conf is
//     replaced (a symlink there is removed) by
//     "nameserver <gw>\noptions timeout:2 attempts:2\n", as gVisor
//     sandboxes have it.
//  6. sethostname(cubicle.hostname or "sandbox").
//  7. Start envd: argv ["/.cubicle/cubicle", "envd"] (what runtime/gvisor
//     runs: cmd/cubicle's serve passes EnvdArgs ["envd"]), environment
//     PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin and
//     HOME=/root, cwd /, uid 0, RLIMIT_NOFILE 1<<20, stdout and stderr on
//     the console. envd serves TCP 49983 (runtime.EnvdPort) on all
//     addresses; the envd token, env vars and user defaults come through
//     envd's POST /init as under gVisor. If envd exits, init logs it on the
//     console and starts it again after a backoff that doubles from 100 ms
//     to at most 10 s (reset once envd has run for 30 s).
//  8. Listen on vsock port 1024 (the control channel, below) and print
//     "cubicle-init: ready" on the console.
//  9. From then on: reap every zombie (PID 1 inherits all orphans), serve
//     the control channel, and on SIGTERM, SIGINT or a poweroff request
//     power off (below).
//
// Init logs to the console (ttyS0) with the prefix "cubicle-init: ".
//
// # Host ↔ guest control channel: vsock port 1024, guest CID 3
//
// The VMM's vsock is Firecracker's hybrid: the host connects to the VM's
// Unix socket, writes "CONNECT 1024\n", reads "OK <port>\n", then speaks to
// init. Requests and responses are one JSON object per line each way; each
// request gets exactly one response, in order: {"ok":true,...} or
// {"ok":false,"error":"..."}. Several connections may be open at once.
//
//	{"op":"ping"}
//	    → {"ok":true,"envd":true|false}: init is up; envd is whether envd
//	      answered GET http://127.0.0.1:49983/health with a 2xx within 1 s.
//	{"op":"identity","unixNano":<int64>,"entropy":"<base64>","hostname":"<name>"}
//	    → {"ok":true}: sets CLOCK_REALTIME to unixNano (required, > 0),
//	      mixes entropy (required, 32 to 512 bytes decoded; the host sends
//	      64 fresh random bytes) into the kernel's pool with RNDADDENTROPY
//	      crediting all its bits, then forces a CRNG reseed with
//	      RNDRESEEDCRNG; sets the hostname when "hostname" is non-empty (a
//	      valid hostname: 1..64 of [A-Za-z0-9.-]). The host sends it after
//	      every restore, before the sandbox serves anything: a clone must
//	      share neither its template's clock nor its RNG state.
//	{"op":"sync"}
//	    → {"ok":true} once sync(2) has returned: the host asks before a
//	      snapshot so that the sandbox disk agrees with memory.
//	{"op":"poweroff"}
//	    → {"ok":true}, then the power-off below.
//
// Bad input (a line that is not one JSON object, an unknown op, a missing
// or malformed field, a line over 64 KiB (MaxRequest)) gets an error
// response and the connection goes on with the next line; PID 1 never
// crashes on it. An idle connection is never closed by init.
//
// # Power off
//
// SIGTERM, SIGINT and {"op":"poweroff"}: SIGTERM to every other process,
// up to 2 s for them to exit, SIGKILL to what remains, sync(2), then
// reboot(LINUX_REBOOT_CMD_RESTART): with reboot=k that is the i8042 reset
// that ends the VM (the VMM's Wait returns nil).
//
// # Failure
//
// A failure before the control channel listens (a missing sandbox disk, a
// mount or network error, a malformed command line) is printed as
// "cubicle-init: fatal: <error>" on the console and the VM is stopped the
// same way (sync, reboot): the host sees the VM end and the reason on the
// console, never a VM that is up but broken. If init itself returned, the
// kernel would panic and, with panic=1, reboot, which also ends the VM.
package guestinit
