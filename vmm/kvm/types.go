//go:build linux && amd64

package kvm

import "unsafe"

// Regs mirrors struct kvm_regs (asm/kvm.h): the general-purpose registers,
// read and written with KVM_GET_REGS / KVM_SET_REGS.
type Regs struct {
	RAX, RBX, RCX, RDX uint64
	RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11   uint64
	R12, R13, R14, R15 uint64
	RIP, RFLAGS        uint64
}

// Segment mirrors struct kvm_segment (asm/kvm.h): a segment register with
// its hidden descriptor cache unpacked.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	Padding  uint8
}

// DTable mirrors struct kvm_dtable (asm/kvm.h): a descriptor table
// register (GDTR or IDTR).
type DTable struct {
	Base    uint64
	Limit   uint16
	Padding [3]uint16
}

// Sregs mirrors struct kvm_sregs (asm/kvm.h): segment, control and
// descriptor-table registers, read and written with KVM_GET/SET_SREGS.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	APICBase               uint64
	// InterruptBitmap has a bit set for a pending external interrupt
	// (KVM_NR_INTERRUPTS = 256 bits).
	InterruptBitmap [4]uint64
}

// FPU mirrors struct kvm_fpu (asm/kvm.h): the legacy x87/SSE state, read
// and written with KVM_GET/SET_FPU.
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	Pad1       uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	Pad2       uint32
}

// MSREntry mirrors struct kvm_msr_entry (asm/kvm.h).
type MSREntry struct {
	Index    uint32
	Reserved uint32
	Data     uint64
}

// CPUIDEntry mirrors struct kvm_cpuid_entry2 (asm/kvm.h): one CPUID
// leaf/subleaf as KVM_GET_SUPPORTED_CPUID reports it and KVM_SET_CPUID2
// takes it.
type CPUIDEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	Padding  [3]uint32
}

// CPUIDFlagSignificantIndex is KVM_CPUID_FLAG_SIGNIFCANT_INDEX (asm/kvm.h):
// the entry applies only to the subleaf in Index.
const CPUIDFlagSignificantIndex = 1 << 0

// XCR mirrors struct kvm_xcr (asm/kvm.h).
type XCR struct {
	XCR      uint32
	Reserved uint32
	Value    uint64
}

// XCRs mirrors struct kvm_xcrs (asm/kvm.h), read and written with
// KVM_GET/SET_XCRS. KVM_MAX_XCRS = 16.
type XCRs struct {
	NrXCRs  uint32
	Flags   uint32
	XCRs    [16]XCR
	Padding [16]uint64
}

// LAPICState mirrors struct kvm_lapic_state (asm/kvm.h): the 1 KiB local
// APIC register page (KVM_APIC_REG_SIZE = 0x400).
type LAPICState struct {
	Regs [0x400]byte
}

// Local APIC register offsets within LAPICState.Regs (Intel SDM vol. 3,
// table 11-1 "Local APIC Register Address Map").
const (
	LAPICRegID    = 0x20
	LAPICRegSVR   = 0xF0
	LAPICRegLVT0  = 0x350
	LAPICRegLVT1  = 0x360
	LAPICModeMask = 0x700 // delivery-mode bits 8..10 of an LVT entry
	LAPICModeNMI  = 0x400 // delivery mode 100b
	LAPICModeExt  = 0x700 // delivery mode 111b (ExtINT)
)

// Get32 returns the 32-bit APIC register at offset off.
func (l *LAPICState) Get32(off int) uint32 {
	b := l.Regs[off : off+4]
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// Set32 sets the 32-bit APIC register at offset off.
func (l *LAPICState) Set32(off int, v uint32) {
	b := l.Regs[off : off+4]
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

// VCPUEvents mirrors struct kvm_vcpu_events (asm/kvm.h): pending and
// injected exceptions, interrupts, NMIs and SMIs, read and written with
// KVM_GET/SET_VCPU_EVENTS.
type VCPUEvents struct {
	Exception struct {
		Injected     uint8
		Nr           uint8
		HasErrorCode uint8
		Pending      uint8
		ErrorCode    uint32
	}
	Interrupt struct {
		Injected uint8
		Nr       uint8
		Soft     uint8
		Shadow   uint8
	}
	NMI struct {
		Injected uint8
		Pending  uint8
		Masked   uint8
		Pad      uint8
	}
	SIPIVector uint32
	Flags      uint32
	SMI        struct {
		SMM          uint8
		Pending      uint8
		SMMInsideNMI uint8
		LatchedInit  uint8
	}
	TripleFaultPending  uint8
	Reserved            [26]uint8
	ExceptionHasPayload uint8
	ExceptionPayload    uint64
}

// Flags of VCPUEvents.Flags (asm/kvm.h KVM_VCPUEVENT_VALID_*): which fields
// KVM_SET_VCPU_EVENTS applies.
const (
	VCPUEventValidNMIPending = 0x01
	VCPUEventValidSIPIVector = 0x02
	VCPUEventValidShadow     = 0x04
	VCPUEventValidSMM        = 0x08
)

// DebugRegs mirrors struct kvm_debugregs (asm/kvm.h).
type DebugRegs struct {
	DB       [4]uint64
	DR6      uint64
	DR7      uint64
	Flags    uint64
	Reserved [9]uint64
}

// MPState mirrors struct kvm_mp_state (linux/kvm.h).
type MPState struct {
	State uint32
}

// MP states (linux/kvm.h KVM_MP_STATE_*).
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSIPIReceived  = 4
)

// IRQChip mirrors struct kvm_irqchip (linux/kvm.h): the state of one
// in-kernel interrupt controller, selected by ChipID. Chip holds a
// kvm_pic_state or kvm_ioapic_state inside a 512-byte union.
type IRQChip struct {
	ChipID uint32
	Pad    uint32
	Chip   [512]byte
}

// Interrupt controller ids for IRQChip.ChipID (asm/kvm.h KVM_IRQCHIP_*).
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
	NumIRQChips      = 3 // KVM_NR_IRQCHIPS
)

// PITChannelState mirrors struct kvm_pit_channel_state (asm/kvm.h).
type PITChannelState struct {
	Count         uint32
	LatchedCount  uint16
	CountLatched  uint8
	StatusLatched uint8
	Status        uint8
	ReadState     uint8
	WriteState    uint8
	WriteLatch    uint8
	RWMode        uint8
	Mode          uint8
	BCD           uint8
	Gate          uint8
	CountLoadTime int64
}

// PITState2 mirrors struct kvm_pit_state2 (asm/kvm.h), read and written
// with KVM_GET/SET_PIT2.
type PITState2 struct {
	Channels [3]PITChannelState
	Flags    uint32
	Reserved [9]uint32
}

// PITConfig mirrors struct kvm_pit_config (linux/kvm.h), the argument of
// KVM_CREATE_PIT2.
type PITConfig struct {
	Flags uint32
	Pad   [15]uint32
}

// PITSpeakerDummy is KVM_PIT_SPEAKER_DUMMY (linux/kvm.h): the in-kernel PIT
// also answers port 0x61 (PC speaker / channel-2 gate) so that guests
// calibrating against PIT channel 2 work without a userspace device.
const PITSpeakerDummy = 1

// ClockData mirrors struct kvm_clock_data (linux/kvm.h), read and written
// with KVM_GET/SET_CLOCK: the VM-wide kvmclock base.
type ClockData struct {
	Clock    uint64
	Flags    uint32
	Pad0     uint32
	Realtime uint64
	HostTSC  uint64
	Pad      [4]uint32
}

// UserspaceMemoryRegion mirrors struct kvm_userspace_memory_region
// (linux/kvm.h), the argument of KVM_SET_USER_MEMORY_REGION.
type UserspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// irqLevel mirrors struct kvm_irq_level (linux/kvm.h).
type irqLevel struct {
	IRQ   uint32
	Level uint32
}

// irqfd mirrors struct kvm_irqfd (linux/kvm.h).
type irqfd struct {
	FD         uint32
	GSI        uint32
	Flags      uint32
	ResampleFD uint32
	Pad        [16]uint8
}

// irqfdFlagDeassign is KVM_IRQFD_FLAG_DEASSIGN (linux/kvm.h).
const irqfdFlagDeassign = 1 << 0

// ioeventfd mirrors struct kvm_ioeventfd (linux/kvm.h).
type ioeventfd struct {
	Datamatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	Pad       [36]uint8
}

// KVM_IOEVENTFD flags (linux/kvm.h KVM_IOEVENTFD_FLAG_*).
const (
	ioeventfdFlagDatamatch = 1 << 0
	ioeventfdFlagPIO       = 1 << 1
	ioeventfdFlagDeassign  = 1 << 2
)

// Sizes of the variable-length headers (linux/kvm.h, asm/kvm.h).
const (
	sizeofMSRsHeader    = 8 // struct kvm_msrs {nmsrs, pad}
	sizeofCPUID2Header  = 8 // struct kvm_cpuid2 {nent, padding}
	sizeofMSRListHeader = 4 // struct kvm_msr_list {nmsrs}
	// XSaveLegacySize is sizeof(struct kvm_xsave) without the flexible
	// array: the buffer KVM_GET_XSAVE fills.
	XSaveLegacySize = 4096
)

// Fixed struct sizes, used in ioctl numbers. layout_test.go checks each
// against the uapi headers.
const (
	sizeofRegs       = unsafe.Sizeof(Regs{})
	sizeofSregs      = unsafe.Sizeof(Sregs{})
	sizeofFPU        = unsafe.Sizeof(FPU{})
	sizeofXCRs       = unsafe.Sizeof(XCRs{})
	sizeofLAPIC      = unsafe.Sizeof(LAPICState{})
	sizeofEvents     = unsafe.Sizeof(VCPUEvents{})
	sizeofDebugRegs  = unsafe.Sizeof(DebugRegs{})
	sizeofMPState    = unsafe.Sizeof(MPState{})
	sizeofIRQChip    = unsafe.Sizeof(IRQChip{})
	sizeofPITState2  = unsafe.Sizeof(PITState2{})
	sizeofPITConfig  = unsafe.Sizeof(PITConfig{})
	sizeofClockData  = unsafe.Sizeof(ClockData{})
	sizeofUserRegion = unsafe.Sizeof(UserspaceMemoryRegion{})
	sizeofIRQLevel   = unsafe.Sizeof(irqLevel{})
	sizeofIRQFD      = unsafe.Sizeof(irqfd{})
	sizeofIOEventFD  = unsafe.Sizeof(ioeventfd{})
)
