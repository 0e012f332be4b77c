//go:build linux && amd64

package kvm

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl request encoding (include/uapi/asm-generic/ioctl.h): nr in bits
// 0..7, type in 8..15, size in 16..29, direction in 30..31.
const (
	iocWrite     = 1
	iocRead      = 2
	iocSizeShift = 16
	iocDirShift  = 30
	kvmio        = 0xAE // KVMIO (linux/kvm.h)
)

// ioctl request numbers (linux/kvm.h). Each is built from the direction,
// KVMIO, the number and the size of the argument struct, exactly as the
// _IO/_IOR/_IOW/_IOWR macros build them.
const (
	kvmGetAPIVersion       = kvmio << 8 // nr 0x00
	kvmCreateVM            = kvmio<<8 | 0x01
	kvmGetMSRIndexList     = (iocRead|iocWrite)<<iocDirShift | sizeofMSRListHeader<<iocSizeShift | kvmio<<8 | 0x02
	kvmCheckExtension      = kvmio<<8 | 0x03
	kvmGetVCPUMmapSize     = kvmio<<8 | 0x04
	kvmGetSupportedCPUID   = (iocRead|iocWrite)<<iocDirShift | sizeofCPUID2Header<<iocSizeShift | kvmio<<8 | 0x05
	kvmGetMSRFeatureList   = (iocRead|iocWrite)<<iocDirShift | sizeofMSRListHeader<<iocSizeShift | kvmio<<8 | 0x0a
	kvmCreateVCPU          = kvmio<<8 | 0x41
	kvmSetUserMemoryRegion = iocWrite<<iocDirShift | sizeofUserRegion<<iocSizeShift | kvmio<<8 | 0x46
	kvmSetTSSAddr          = kvmio<<8 | 0x47
	kvmGetDirtyLog         = iocWrite<<iocDirShift | sizeofDirtyLog<<iocSizeShift | kvmio<<8 | 0x42
	kvmClearDirtyLog       = (iocRead|iocWrite)<<iocDirShift | sizeofClearDirtyLog<<iocSizeShift | kvmio<<8 | 0xc0
	kvmEnableCap           = iocWrite<<iocDirShift | sizeofEnableCap<<iocSizeShift | kvmio<<8 | 0xa3
	kvmSetIdentityMapAddr  = iocWrite<<iocDirShift | 8<<iocSizeShift | kvmio<<8 | 0x48
	kvmCreateIRQChip       = kvmio<<8 | 0x60
	kvmIRQLine             = iocWrite<<iocDirShift | sizeofIRQLevel<<iocSizeShift | kvmio<<8 | 0x61
	kvmGetIRQChip          = (iocRead|iocWrite)<<iocDirShift | sizeofIRQChip<<iocSizeShift | kvmio<<8 | 0x62
	kvmSetIRQChip          = iocRead<<iocDirShift | sizeofIRQChip<<iocSizeShift | kvmio<<8 | 0x63
	kvmIRQFD               = iocWrite<<iocDirShift | sizeofIRQFD<<iocSizeShift | kvmio<<8 | 0x76
	kvmCreatePIT2          = iocWrite<<iocDirShift | sizeofPITConfig<<iocSizeShift | kvmio<<8 | 0x77
	kvmIOEventFD           = iocWrite<<iocDirShift | sizeofIOEventFD<<iocSizeShift | kvmio<<8 | 0x79
	kvmSetClock            = iocWrite<<iocDirShift | sizeofClockData<<iocSizeShift | kvmio<<8 | 0x7b
	kvmGetClock            = iocRead<<iocDirShift | sizeofClockData<<iocSizeShift | kvmio<<8 | 0x7c
	kvmGetPIT2             = iocRead<<iocDirShift | sizeofPITState2<<iocSizeShift | kvmio<<8 | 0x9f
	kvmSetPIT2             = iocWrite<<iocDirShift | sizeofPITState2<<iocSizeShift | kvmio<<8 | 0xa0

	kvmRun           = kvmio<<8 | 0x80
	kvmGetRegs       = iocRead<<iocDirShift | sizeofRegs<<iocSizeShift | kvmio<<8 | 0x81
	kvmSetRegs       = iocWrite<<iocDirShift | sizeofRegs<<iocSizeShift | kvmio<<8 | 0x82
	kvmGetSregs      = iocRead<<iocDirShift | sizeofSregs<<iocSizeShift | kvmio<<8 | 0x83
	kvmSetSregs      = iocWrite<<iocDirShift | sizeofSregs<<iocSizeShift | kvmio<<8 | 0x84
	kvmGetMSRs       = (iocRead|iocWrite)<<iocDirShift | sizeofMSRsHeader<<iocSizeShift | kvmio<<8 | 0x88
	kvmSetMSRs       = iocWrite<<iocDirShift | sizeofMSRsHeader<<iocSizeShift | kvmio<<8 | 0x89
	kvmGetFPU        = iocRead<<iocDirShift | sizeofFPU<<iocSizeShift | kvmio<<8 | 0x8c
	kvmSetFPU        = iocWrite<<iocDirShift | sizeofFPU<<iocSizeShift | kvmio<<8 | 0x8d
	kvmGetLAPIC      = iocRead<<iocDirShift | sizeofLAPIC<<iocSizeShift | kvmio<<8 | 0x8e
	kvmSetLAPIC      = iocWrite<<iocDirShift | sizeofLAPIC<<iocSizeShift | kvmio<<8 | 0x8f
	kvmSetCPUID2     = iocWrite<<iocDirShift | sizeofCPUID2Header<<iocSizeShift | kvmio<<8 | 0x90
	kvmGetCPUID2     = (iocRead|iocWrite)<<iocDirShift | sizeofCPUID2Header<<iocSizeShift | kvmio<<8 | 0x91
	kvmGetMPState    = iocRead<<iocDirShift | sizeofMPState<<iocSizeShift | kvmio<<8 | 0x98
	kvmSetMPState    = iocWrite<<iocDirShift | sizeofMPState<<iocSizeShift | kvmio<<8 | 0x99
	kvmGetVCPUEvents = iocRead<<iocDirShift | sizeofEvents<<iocSizeShift | kvmio<<8 | 0x9f
	kvmSetVCPUEvents = iocWrite<<iocDirShift | sizeofEvents<<iocSizeShift | kvmio<<8 | 0xa0
	kvmGetDebugRegs  = iocRead<<iocDirShift | sizeofDebugRegs<<iocSizeShift | kvmio<<8 | 0xa1
	kvmSetDebugRegs  = iocWrite<<iocDirShift | sizeofDebugRegs<<iocSizeShift | kvmio<<8 | 0xa2
	kvmSetTSCKHz     = kvmio<<8 | 0xa2
	kvmGetTSCKHz     = kvmio<<8 | 0xa3
	kvmGetXSave      = iocRead<<iocDirShift | XSaveLegacySize<<iocSizeShift | kvmio<<8 | 0xa4
	kvmSetXSave      = iocWrite<<iocDirShift | XSaveLegacySize<<iocSizeShift | kvmio<<8 | 0xa5
	kvmGetXCRs       = iocRead<<iocDirShift | sizeofXCRs<<iocSizeShift | kvmio<<8 | 0xa6
	kvmSetXCRs       = iocWrite<<iocDirShift | sizeofXCRs<<iocSizeShift | kvmio<<8 | 0xa7
	kvmGetXSave2     = iocRead<<iocDirShift | XSaveLegacySize<<iocSizeShift | kvmio<<8 | 0xcf
)

// KVM_CHECK_EXTENSION capabilities used by this package (linux/kvm.h).
const (
	CapIRQChip       = 0
	CapUserMemory    = 3
	CapSetTSSAddr    = 4
	CapExtCPUID      = 7
	CapNrVCPUs       = 9
	CapNrMemSlots    = 10
	CapMPState       = 14
	CapIRQFD         = 32
	CapPIT2          = 33
	CapPITState2     = 35
	CapIOEventFD     = 36
	CapAdjustClock   = 39
	CapVCPUEvents    = 41
	CapDebugRegs     = 50
	CapXSave         = 55
	CapXCRs          = 56
	CapTSCControl    = 60
	CapGetTSCKHz     = 61
	CapMaxVCPUs      = 66
	CapImmediateExit = 136
	CapXSave2        = 208

	CapManualDirtyLogProtect2 = 168
)

// ioctl issues an ioctl whose argument is a plain integer.
func ioctl(fd int, req uintptr, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// ioctlPtr issues an ioctl whose argument points at memory the kernel reads
// or writes. The conversion to uintptr happens inside the Syscall argument
// list, which keeps the pointed-to object alive and unmoved for the call.
func ioctlPtr(fd int, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return r, errno
	}
	return r, nil
}
