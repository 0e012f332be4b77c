//go:build linux && amd64

package kvm

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DevicePath is where the KVM system device lives.
const DevicePath = "/dev/kvm"

// APIVersion is KVM_API_VERSION (linux/kvm.h); KVM_GET_API_VERSION must
// return exactly this.
const APIVersion = 12

// maxCPUIDEntries is KVM_MAX_CPUID_ENTRIES (arch/x86/include/asm/kvm_host.h),
// the most entries KVM_GET_SUPPORTED_CPUID and KVM_SET_CPUID2 handle.
const maxCPUIDEntries = 256

var (
	// ErrNoKVM is returned by Open when the KVM device does not exist.
	ErrNoKVM = errors.New("kvm: " + DevicePath + " not present")
	// ErrAPIVersion is returned by Open when the kernel speaks another
	// KVM API version.
	ErrAPIVersion = errors.New("kvm: unsupported KVM API version")
	// ErrMissingCapability is returned by Open when the kernel lacks a
	// capability this VMM depends on.
	ErrMissingCapability = errors.New("kvm: required capability missing")
)

// capability names a KVM_CHECK_EXTENSION capability.
type capability struct {
	cap  int
	name string
}

// requiredCaps returns the capabilities cubicle's VMM cannot work without.
func requiredCaps() []capability {
	return []capability{
		{CapIRQChip, "KVM_CAP_IRQCHIP"},
		{CapUserMemory, "KVM_CAP_USER_MEMORY"},
		{CapSetTSSAddr, "KVM_CAP_SET_TSS_ADDR"},
		{CapExtCPUID, "KVM_CAP_EXT_CPUID"},
		{CapMPState, "KVM_CAP_MP_STATE"},
		{CapIRQFD, "KVM_CAP_IRQFD"},
		{CapPIT2, "KVM_CAP_PIT2"},
		{CapPITState2, "KVM_CAP_PIT_STATE2"},
		{CapIOEventFD, "KVM_CAP_IOEVENTFD"},
		{CapAdjustClock, "KVM_CAP_ADJUST_CLOCK"},
		{CapVCPUEvents, "KVM_CAP_VCPU_EVENTS"},
		{CapDebugRegs, "KVM_CAP_DEBUGREGS"},
		{CapXSave, "KVM_CAP_XSAVE"},
		{CapXCRs, "KVM_CAP_XCRS"},
		{CapGetTSCKHz, "KVM_CAP_GET_TSC_KHZ"},
		{CapImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"},
	}
}

// System is an open handle on /dev/kvm. It is safe for concurrent use and
// may be shared by many VMs; the lists it reads from the kernel are cached
// on first use.
type System struct {
	fd       int
	mmapSize int

	cpuidOnce sync.Once
	cpuid     []CPUIDEntry
	cpuidErr  error

	msrOnce sync.Once
	msrs    []uint32
	msrErr  error

	snapMSRs snapshotMSRCache

	pvmOnce sync.Once
	pvm     bool
}

// Open opens /dev/kvm, checks the API version and the capabilities the VMM
// needs.
func Open() (*System, error) { return OpenPath(DevicePath) }

// OpenPath is Open for a KVM device at another path.
func OpenPath(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%w: %w", ErrNoKVM, err)
		}
		return nil, fmt.Errorf("kvm: open %s: %w", path, err)
	}
	s := &System{fd: fd}
	if err := s.check(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return s, nil
}

func (s *System) check() error {
	v, err := ioctl(s.fd, kvmGetAPIVersion, 0)
	if err != nil {
		return fmt.Errorf("kvm: KVM_GET_API_VERSION: %w", err)
	}
	if v != APIVersion {
		return fmt.Errorf("%w: kernel has %d, want %d", ErrAPIVersion, v, APIVersion)
	}
	for _, c := range requiredCaps() {
		n, err := s.CheckExtension(c.cap)
		if err != nil {
			return err
		}
		if n <= 0 {
			return fmt.Errorf("%w: %s", ErrMissingCapability, c.name)
		}
	}
	sz, err := ioctl(s.fd, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return fmt.Errorf("kvm: KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	if int(sz) < os.Getpagesize() {
		return fmt.Errorf("kvm: KVM_GET_VCPU_MMAP_SIZE returned %d", sz)
	}
	s.mmapSize = int(sz)
	return nil
}

// Close closes the handle. VMs created from it stay valid.
func (s *System) Close() error { return unix.Close(s.fd) }

// CheckExtension returns KVM_CHECK_EXTENSION for cap on the system fd: 0
// when unsupported, otherwise a capability-specific positive value.
func (s *System) CheckExtension(cap int) (int, error) {
	n, err := ioctl(s.fd, kvmCheckExtension, uintptr(cap))
	if err != nil {
		return 0, fmt.Errorf("kvm: KVM_CHECK_EXTENSION(%d): %w", cap, err)
	}
	return int(n), nil
}

// VCPUMmapSize is KVM_GET_VCPU_MMAP_SIZE: the size of each vCPU's shared
// kvm_run area.
func (s *System) VCPUMmapSize() int { return s.mmapSize }

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID: every CPUID leaf KVM can
// present to a guest on this host, with the features it can virtualise.
// The returned slice is a copy the caller may modify.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	s.cpuidOnce.Do(func() {
		s.cpuid, s.cpuidErr = s.getCPUIDList(kvmGetSupportedCPUID, "KVM_GET_SUPPORTED_CPUID")
	})
	if s.cpuidErr != nil {
		return nil, s.cpuidErr
	}
	return append([]CPUIDEntry(nil), s.cpuid...), nil
}

func (s *System) getCPUIDList(req uintptr, name string) ([]CPUIDEntry, error) {
	for n := maxCPUIDEntries; n <= 4*maxCPUIDEntries; n *= 2 {
		buf := make([]byte, sizeofCPUID2Header+n*int(unsafe.Sizeof(CPUIDEntry{})))
		*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(n)
		_, err := ioctlPtr(s.fd, req, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("kvm: %s: %w", name, err)
		}
		got := *(*uint32)(unsafe.Pointer(&buf[0]))
		entries := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[sizeofCPUID2Header])), n)
		return append([]CPUIDEntry(nil), entries[:got]...), nil
	}
	return nil, fmt.Errorf("kvm: %s: more than %d entries", name, 4*maxCPUIDEntries)
}

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and
// restores for a guest on this host. It does not include MSRs outside
// KVM's save list; see SnapshotMSRs for the full set a snapshot needs.
func (s *System) MSRIndexList() ([]uint32, error) {
	s.msrOnce.Do(func() {
		s.msrs, s.msrErr = s.getMSRList(kvmGetMSRIndexList, "KVM_GET_MSR_INDEX_LIST")
	})
	if s.msrErr != nil {
		return nil, s.msrErr
	}
	return append([]uint32(nil), s.msrs...), nil
}

// FeatureMSRIndexList returns KVM_GET_MSR_FEATURE_INDEX_LIST: the
// read-only feature MSRs (e.g. IA32_ARCH_CAPABILITIES) KVM lets userspace
// query on the system fd.
func (s *System) FeatureMSRIndexList() ([]uint32, error) {
	return s.getMSRList(kvmGetMSRFeatureList, "KVM_GET_MSR_FEATURE_INDEX_LIST")
}

func (s *System) getMSRList(req uintptr, name string) ([]uint32, error) {
	// The first call with nmsrs = 0 fails with E2BIG and reports the
	// count (Documentation/virt/kvm/api.rst, 4.3).
	var hdr [sizeofMSRListHeader]byte
	_, err := ioctlPtr(s.fd, req, unsafe.Pointer(&hdr[0]))
	if err != nil && !errors.Is(err, unix.E2BIG) {
		return nil, fmt.Errorf("kvm: %s: %w", name, err)
	}
	n := *(*uint32)(unsafe.Pointer(&hdr[0]))
	if n == 0 {
		return nil, nil
	}
	buf := make([]uint32, 1+n)
	buf[0] = n
	if _, err := ioctlPtr(s.fd, req, unsafe.Pointer(&buf[0])); err != nil {
		return nil, fmt.Errorf("kvm: %s: %w", name, err)
	}
	return append([]uint32(nil), buf[1:1+buf[0]]...), nil
}

// pvmModulePath exists when the kvm-pvm vendor module is loaded.
const pvmModulePath = "/sys/module/kvm_pvm"

// PVM reports whether this KVM is a PVM host (guests run in hardware user
// mode, supervisor code is emulated, no VT-x/SVM). The documented signal is
// the "PVM" signature in leaf 0x40000002 of KVM_GET_SUPPORTED_CPUID; some
// kvm-pvm builds (the development hosts' among them) do not report that
// leaf, so a loaded kvm_pvm module counts too.
//
// The answer is worked out once per System: a jailed VMM asks before it
// loses sight of /sys.
func (s *System) PVM() bool {
	s.pvmOnce.Do(func() {
		if c, err := s.SupportedCPUID(); err == nil && IsPVM(c) {
			s.pvm = true
			return
		}
		_, err := os.Stat(pvmModulePath)
		s.pvm = err == nil
	})
	return s.pvm
}

// CreateVM creates a new, empty virtual machine (KVM_CREATE_VM, default
// machine type).
func (s *System) CreateVM() (*VM, error) {
	// KVM_CREATE_VM fails with EINTR when a signal is pending while it
	// sets the VM up (Go's preemption signal, SIGURG, will be under load);
	// nothing was created then, so trying again is safe.
	var fd uintptr
	var err error
	for range 100 {
		if fd, err = ioctl(s.fd, kvmCreateVM, 0); err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_CREATE_VM: %w", err)
	}
	// KVM creates VM and vCPU fds with O_CLOEXEC already.
	return &VM{sys: s, fd: int(fd)}, nil
}
