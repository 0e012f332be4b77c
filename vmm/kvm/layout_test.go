//go:build linux && amd64

package kvm

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/cubicle-dev/cubicle/internal/testenv"
)

// TestStructSizes pins every uapi mirror to the size of its C struct in
// <linux/kvm.h> / <asm/kvm.h> (x86-64).
func TestStructSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"kvm_dtable", unsafe.Sizeof(DTable{}), 16},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"kvm_msr_entry", unsafe.Sizeof(MSREntry{}), 16},
		{"kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry{}), 40},
		{"kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"kvm_lapic_state", unsafe.Sizeof(LAPICState{}), 1024},
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"kvm_mp_state", unsafe.Sizeof(MPState{}), 4},
		{"kvm_irqchip", unsafe.Sizeof(IRQChip{}), 520},
		{"kvm_pit_channel_state", unsafe.Sizeof(PITChannelState{}), 24},
		{"kvm_pit_state2", unsafe.Sizeof(PITState2{}), 112},
		{"kvm_pit_config", unsafe.Sizeof(PITConfig{}), 64},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_userspace_memory_region", unsafe.Sizeof(UserspaceMemoryRegion{}), 32},
		{"kvm_irq_level", unsafe.Sizeof(irqLevel{}), 8},
		{"kvm_irqfd", unsafe.Sizeof(irqfd{}), 32},
		{"kvm_ioeventfd", unsafe.Sizeof(ioeventfd{}), 64},
		{"kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16},
		{"kvm_clear_dirty_log", unsafe.Sizeof(clearDirtyLog{}), 24},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
	} {
		if c.got != c.want {
			t.Errorf("sizeof(%s) = %d, want %d", c.name, c.got, c.want)
		}
	}
}

// cLayout is a C program that prints, from the system's uapi headers, the
// sizes, field offsets and ioctl numbers the Go mirrors must agree with.
const cLayout = `
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
#define S(n, t) printf("size %s %zu\n", n, sizeof(t))
#define O(n, t, f) printf("off %s %zu\n", n, offsetof(t, f))
#define I(n) printf("ioctl %s %lu\n", #n, (unsigned long)(n))
int main(void) {
	S("Regs", struct kvm_regs); S("Sregs", struct kvm_sregs); S("FPU", struct kvm_fpu);
	S("XCRs", struct kvm_xcrs); S("LAPICState", struct kvm_lapic_state);
	S("VCPUEvents", struct kvm_vcpu_events); S("DebugRegs", struct kvm_debugregs);
	S("IRQChip", struct kvm_irqchip); S("PITState2", struct kvm_pit_state2);
	S("ClockData", struct kvm_clock_data); S("CPUIDEntry", struct kvm_cpuid_entry2);
	S("IOEventFD", struct kvm_ioeventfd); S("IRQFD", struct kvm_irqfd);
	S("DirtyLog", struct kvm_dirty_log); S("ClearDirtyLog", struct kvm_clear_dirty_log);
	S("EnableCap", struct kvm_enable_cap);
	O("DirtyLog.Bitmap", struct kvm_dirty_log, dirty_bitmap);
	O("ClearDirtyLog.FirstPage", struct kvm_clear_dirty_log, first_page);
	O("ClearDirtyLog.Bitmap", struct kvm_clear_dirty_log, dirty_bitmap);
	O("EnableCap.Args", struct kvm_enable_cap, args);
	printf("const KVM_MEM_LOG_DIRTY_PAGES %d\n", KVM_MEM_LOG_DIRTY_PAGES);
	printf("const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 %d\n", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
	printf("const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE %d\n", KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
	O("Sregs.GDT", struct kvm_sregs, gdt); O("Sregs.CR0", struct kvm_sregs, cr0);
	O("Sregs.APICBase", struct kvm_sregs, apic_base);
	O("Sregs.InterruptBitmap", struct kvm_sregs, interrupt_bitmap);
	O("FPU.XMM", struct kvm_fpu, xmm); O("FPU.MXCSR", struct kvm_fpu, mxcsr);
	O("VCPUEvents.SIPIVector", struct kvm_vcpu_events, sipi_vector);
	O("VCPUEvents.SMI", struct kvm_vcpu_events, smi);
	O("VCPUEvents.TripleFaultPending", struct kvm_vcpu_events, triple_fault);
	O("VCPUEvents.ExceptionPayload", struct kvm_vcpu_events, exception_payload);
	O("PITState2.Flags", struct kvm_pit_state2, flags);
	O("ClockData.Realtime", struct kvm_clock_data, realtime);
	O("IOEventFD.FD", struct kvm_ioeventfd, fd);
	O("run.immediate_exit", struct kvm_run, immediate_exit);
	O("run.exit_reason", struct kvm_run, exit_reason);
	O("run.io.port", struct kvm_run, io.port); O("run.io.count", struct kvm_run, io.count);
	O("run.io.data_offset", struct kvm_run, io.data_offset);
	O("run.mmio.data", struct kvm_run, mmio.data); O("run.mmio.len", struct kvm_run, mmio.len);
	O("run.mmio.is_write", struct kvm_run, mmio.is_write);
	O("run.fail_entry.cpu", struct kvm_run, fail_entry.cpu);
	O("run.internal.data", struct kvm_run, internal.data);
	O("run.system_event.data", struct kvm_run, system_event.data);
	I(KVM_GET_API_VERSION); I(KVM_CREATE_VM); I(KVM_GET_MSR_INDEX_LIST); I(KVM_CHECK_EXTENSION);
	I(KVM_GET_VCPU_MMAP_SIZE); I(KVM_GET_SUPPORTED_CPUID); I(KVM_GET_MSR_FEATURE_INDEX_LIST);
	I(KVM_CREATE_VCPU); I(KVM_SET_USER_MEMORY_REGION); I(KVM_SET_TSS_ADDR);
	I(KVM_SET_IDENTITY_MAP_ADDR); I(KVM_CREATE_IRQCHIP); I(KVM_IRQ_LINE); I(KVM_GET_IRQCHIP);
	I(KVM_SET_IRQCHIP); I(KVM_IRQFD); I(KVM_CREATE_PIT2); I(KVM_IOEVENTFD); I(KVM_SET_CLOCK);
	I(KVM_GET_CLOCK); I(KVM_GET_PIT2); I(KVM_SET_PIT2); I(KVM_RUN); I(KVM_GET_REGS);
	I(KVM_SET_REGS); I(KVM_GET_SREGS); I(KVM_SET_SREGS); I(KVM_GET_MSRS); I(KVM_SET_MSRS);
	I(KVM_GET_FPU); I(KVM_SET_FPU); I(KVM_GET_LAPIC); I(KVM_SET_LAPIC); I(KVM_SET_CPUID2);
	I(KVM_GET_CPUID2); I(KVM_GET_MP_STATE); I(KVM_SET_MP_STATE); I(KVM_GET_VCPU_EVENTS);
	I(KVM_SET_VCPU_EVENTS); I(KVM_GET_DEBUGREGS); I(KVM_SET_DEBUGREGS); I(KVM_SET_TSC_KHZ);
	I(KVM_GET_TSC_KHZ); I(KVM_GET_XSAVE); I(KVM_SET_XSAVE); I(KVM_GET_XCRS); I(KVM_SET_XCRS);
	I(KVM_GET_XSAVE2); I(KVM_GET_DIRTY_LOG); I(KVM_CLEAR_DIRTY_LOG); I(KVM_ENABLE_CAP);
	return 0;
}
`

// TestLayoutAgainstHeaders compiles cLayout with the system compiler and
// compares every number with the Go side. It needs gcc and the kernel uapi
// headers (linux-libc-dev); they are part of the development machines.
func TestLayoutAgainstHeaders(t *testing.T) {
	testenv.RequireCommand(t, "gcc") // scripts/deps.sh --test installs it
	dir := t.TempDir()
	src := filepath.Join(dir, "layout.c")
	bin := filepath.Join(dir, "layout")
	if err := os.WriteFile(src, []byte(cLayout), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("gcc", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	goSide := map[string]uintptr{
		"size Regs": uintptr(sizeofRegs), "size Sregs": uintptr(sizeofSregs), "size FPU": uintptr(sizeofFPU),
		"size XCRs": uintptr(sizeofXCRs), "size LAPICState": uintptr(sizeofLAPIC),
		"size VCPUEvents": uintptr(sizeofEvents), "size DebugRegs": uintptr(sizeofDebugRegs),
		"size IRQChip": uintptr(sizeofIRQChip), "size PITState2": uintptr(sizeofPITState2),
		"size ClockData": uintptr(sizeofClockData), "size CPUIDEntry": uintptr(unsafe.Sizeof(CPUIDEntry{})),
		"size IOEventFD": uintptr(sizeofIOEventFD), "size IRQFD": uintptr(sizeofIRQFD),
		"off Sregs.GDT":                             uintptr(unsafe.Offsetof(Sregs{}.GDT)),
		"off Sregs.CR0":                             uintptr(unsafe.Offsetof(Sregs{}.CR0)),
		"off Sregs.APICBase":                        uintptr(unsafe.Offsetof(Sregs{}.APICBase)),
		"off Sregs.InterruptBitmap":                 uintptr(unsafe.Offsetof(Sregs{}.InterruptBitmap)),
		"off FPU.XMM":                               uintptr(unsafe.Offsetof(FPU{}.XMM)),
		"off FPU.MXCSR":                             uintptr(unsafe.Offsetof(FPU{}.MXCSR)),
		"off VCPUEvents.SIPIVector":                 uintptr(unsafe.Offsetof(VCPUEvents{}.SIPIVector)),
		"off VCPUEvents.SMI":                        uintptr(unsafe.Offsetof(VCPUEvents{}.SMI)),
		"off VCPUEvents.TripleFaultPending":         uintptr(unsafe.Offsetof(VCPUEvents{}.TripleFaultPending)),
		"off VCPUEvents.ExceptionPayload":           uintptr(unsafe.Offsetof(VCPUEvents{}.ExceptionPayload)),
		"off PITState2.Flags":                       uintptr(unsafe.Offsetof(PITState2{}.Flags)),
		"off ClockData.Realtime":                    uintptr(unsafe.Offsetof(ClockData{}.Realtime)),
		"off IOEventFD.FD":                          uintptr(unsafe.Offsetof(ioeventfd{}.FD)),
		"off run.immediate_exit":                    runImmediateExit,
		"off run.exit_reason":                       runExitReason,
		"off run.io.port":                           runIOPort,
		"off run.io.count":                          runIOCount,
		"off run.io.data_offset":                    runIODataOffset,
		"off run.mmio.data":                         runMMIOData,
		"off run.mmio.len":                          runMMIOLen,
		"off run.mmio.is_write":                     runMMIOIsWrite,
		"off run.fail_entry.cpu":                    runFailCPU,
		"off run.internal.data":                     runInternalData,
		"off run.system_event.data":                 runSystemEventData,
		"ioctl KVM_GET_API_VERSION":                 kvmGetAPIVersion,
		"ioctl KVM_CREATE_VM":                       kvmCreateVM,
		"ioctl KVM_GET_MSR_INDEX_LIST":              kvmGetMSRIndexList,
		"ioctl KVM_CHECK_EXTENSION":                 kvmCheckExtension,
		"ioctl KVM_GET_VCPU_MMAP_SIZE":              kvmGetVCPUMmapSize,
		"ioctl KVM_GET_SUPPORTED_CPUID":             kvmGetSupportedCPUID,
		"ioctl KVM_GET_MSR_FEATURE_INDEX_LIST":      kvmGetMSRFeatureList,
		"ioctl KVM_CREATE_VCPU":                     kvmCreateVCPU,
		"ioctl KVM_SET_USER_MEMORY_REGION":          kvmSetUserMemoryRegion,
		"ioctl KVM_SET_TSS_ADDR":                    kvmSetTSSAddr,
		"ioctl KVM_SET_IDENTITY_MAP_ADDR":           kvmSetIdentityMapAddr,
		"ioctl KVM_CREATE_IRQCHIP":                  kvmCreateIRQChip,
		"ioctl KVM_IRQ_LINE":                        kvmIRQLine,
		"ioctl KVM_GET_IRQCHIP":                     kvmGetIRQChip,
		"ioctl KVM_SET_IRQCHIP":                     kvmSetIRQChip,
		"ioctl KVM_IRQFD":                           kvmIRQFD,
		"ioctl KVM_CREATE_PIT2":                     kvmCreatePIT2,
		"ioctl KVM_IOEVENTFD":                       kvmIOEventFD,
		"ioctl KVM_SET_CLOCK":                       kvmSetClock,
		"ioctl KVM_GET_CLOCK":                       kvmGetClock,
		"ioctl KVM_GET_PIT2":                        kvmGetPIT2,
		"ioctl KVM_SET_PIT2":                        kvmSetPIT2,
		"ioctl KVM_RUN":                             kvmRun,
		"ioctl KVM_GET_REGS":                        kvmGetRegs,
		"ioctl KVM_SET_REGS":                        kvmSetRegs,
		"ioctl KVM_GET_SREGS":                       kvmGetSregs,
		"ioctl KVM_SET_SREGS":                       kvmSetSregs,
		"ioctl KVM_GET_MSRS":                        kvmGetMSRs,
		"ioctl KVM_SET_MSRS":                        kvmSetMSRs,
		"ioctl KVM_GET_FPU":                         kvmGetFPU,
		"ioctl KVM_SET_FPU":                         kvmSetFPU,
		"ioctl KVM_GET_LAPIC":                       kvmGetLAPIC,
		"ioctl KVM_SET_LAPIC":                       kvmSetLAPIC,
		"ioctl KVM_SET_CPUID2":                      kvmSetCPUID2,
		"ioctl KVM_GET_CPUID2":                      kvmGetCPUID2,
		"ioctl KVM_GET_MP_STATE":                    kvmGetMPState,
		"ioctl KVM_SET_MP_STATE":                    kvmSetMPState,
		"ioctl KVM_GET_VCPU_EVENTS":                 kvmGetVCPUEvents,
		"ioctl KVM_SET_VCPU_EVENTS":                 kvmSetVCPUEvents,
		"ioctl KVM_GET_DEBUGREGS":                   kvmGetDebugRegs,
		"ioctl KVM_SET_DEBUGREGS":                   kvmSetDebugRegs,
		"ioctl KVM_SET_TSC_KHZ":                     kvmSetTSCKHz,
		"ioctl KVM_GET_TSC_KHZ":                     kvmGetTSCKHz,
		"ioctl KVM_GET_XSAVE":                       kvmGetXSave,
		"ioctl KVM_SET_XSAVE":                       kvmSetXSave,
		"ioctl KVM_GET_XCRS":                        kvmGetXCRs,
		"ioctl KVM_SET_XCRS":                        kvmSetXCRs,
		"ioctl KVM_GET_XSAVE2":                      kvmGetXSave2,
		"ioctl KVM_GET_DIRTY_LOG":                   kvmGetDirtyLog,
		"ioctl KVM_CLEAR_DIRTY_LOG":                 kvmClearDirtyLog,
		"ioctl KVM_ENABLE_CAP":                      kvmEnableCap,
		"size DirtyLog":                             sizeofDirtyLog,
		"size ClearDirtyLog":                        sizeofClearDirtyLog,
		"size EnableCap":                            sizeofEnableCap,
		"off DirtyLog.Bitmap":                       uintptr(unsafe.Offsetof(dirtyLog{}.Bitmap)),
		"off ClearDirtyLog.FirstPage":               uintptr(unsafe.Offsetof(clearDirtyLog{}.FirstPage)),
		"off ClearDirtyLog.Bitmap":                  uintptr(unsafe.Offsetof(clearDirtyLog{}.Bitmap)),
		"off EnableCap.Args":                        uintptr(unsafe.Offsetof(enableCap{}.Args)),
		"const KVM_MEM_LOG_DIRTY_PAGES":             MemLogDirtyPages,
		"const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2":   CapManualDirtyLogProtect2,
		"const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": dirtyLogManualProtectEnable,
	}
	seen := 0
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 {
			t.Fatalf("bad line %q", sc.Text())
		}
		key := f[0] + " " + f[1]
		want, err := strconv.ParseUint(f[2], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		got, ok := goSide[key]
		if !ok {
			t.Errorf("%s: no Go counterpart", key)
			continue
		}
		seen++
		if uint64(got) != want {
			t.Errorf("%s: Go %d (%#x), C %d (%#x)", key, got, got, want, want)
		}
	}
	if seen != len(goSide) {
		t.Errorf("compared %d values, Go side has %d", seen, len(goSide))
	}
}
