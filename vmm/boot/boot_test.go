package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
	"github.com/cubicle-dev/cubicle/vmm/testguest"
)

func newMem(t *testing.T, size uint64) *memory.Memory {
	t.Helper()
	m, err := memory.New(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func loadFile(t *testing.T, m *memory.Memory, path string) (*Kernel, error) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return LoadKernel(m, bytes.NewReader(b), int64(len(b)))
}

func u32(m *memory.Memory, a uint64) uint32 {
	b, _ := m.Slice(a, 4)
	return binary.LittleEndian.Uint32(b)
}

func u64(m *memory.Memory, a uint64) uint64 {
	b, _ := m.Slice(a, 8)
	return binary.LittleEndian.Uint64(b)
}

func TestLoadELFAndLinux64(t *testing.T) {
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	m := newMem(t, 64<<20)
	k, err := loadFile(t, m, imgs.ELF)
	if err != nil {
		t.Fatal(err)
	}
	if k.Format != FormatELF || k.Entry != 0x100200 || k.PVHEntry != 0x100000 || k.Start != 0x100000 || k.End <= k.Entry {
		t.Fatalf("kernel %+v", k)
	}
	bs, err := Setup(m, k, Config{Cmdline: "console=ttyS0 x=1", VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	if bs.Regs.RIP != k.Entry || bs.Regs.RSI != ZeroPageAddr || bs.Regs.RFLAGS != 2 {
		t.Errorf("regs %+v", bs.Regs)
	}
	var s kvm.Sregs
	s.CR0 = 0x60000010 // KVM's reset value: CD|NW|ET
	bs.ApplySregs(&s)
	if s.CS.Selector != SelectorCode64 || s.CS.L != 1 || s.CS.DB != 0 || s.DS.Selector != SelectorData ||
		s.CR0 != 0x80000011 || s.CR3 != PML4Addr || s.CR4 != 0x20 || s.EFER != 0x500 || s.CS.Limit != 0xffffffff {
		t.Errorf("sregs cs=%+v cr0=%#x cr3=%#x cr4=%#x efer=%#x", s.CS, s.CR0, s.CR3, s.CR4, s.EFER)
	}
	// Zero page: loader type, command line, e820.
	zp, _ := m.Slice(ZeroPageAddr, 4096)
	if zp[hdrTypeOfLoader] != 0xff || u32(m, ZeroPageAddr+hdrMagicOff) != hdrMagic || u32(m, ZeroPageAddr+hdrCmdLinePtr) != CmdlineAddr {
		t.Error("setup header fields")
	}
	cl, _ := m.Slice(CmdlineAddr, 18)
	if string(cl) != "console=ttyS0 x=1\x00" {
		t.Errorf("cmdline %q", cl)
	}
	if zp[bpE820Entries] != 3 || u64(m, ZeroPageAddr+bpE820Table+2*20) != HighMemStart || u64(m, ZeroPageAddr+bpE820Table+2*20+8) != 63<<20 {
		t.Errorf("e820: %d entries", zp[bpE820Entries])
	}
	// Identity map: PML4 → PDPT → PD; 2 MiB page 1535 maps 3 GiB - 2 MiB.
	if u64(m, PML4Addr) != PDPTAddr|3 || u64(m, PDPTAddr+8*2) != (PDAddr+2*4096)|3 || u64(m, PDAddr+8*1535) != 1535<<21|0x83 {
		t.Error("page tables")
	}
	// GDT holds the descriptors the selectors name.
	if u64(m, GDTAddr+SelectorCode64) != 0x00af9b000000ffff || u64(m, GDTAddr+SelectorData) != 0x00cf93000000ffff {
		t.Errorf("GDT %#x %#x", u64(m, GDTAddr+SelectorCode64), u64(m, GDTAddr+SelectorData))
	}
}

func TestPVH(t *testing.T) {
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	m := newMem(t, 5<<30)
	k, err := loadFile(t, m, imgs.ELF)
	if err != nil {
		t.Fatal(err)
	}
	bs, err := Setup(m, k, Config{Cmdline: "pvh", VCPUs: 1, Protocol: ProtocolPVH})
	if err != nil {
		t.Fatal(err)
	}
	if bs.Regs.RIP != 0x100000 || bs.Regs.RBX != StartInfoAddr {
		t.Errorf("regs %+v", bs.Regs)
	}
	var s kvm.Sregs
	bs.ApplySregs(&s)
	if s.CS.Selector != SelectorCode32 || s.CS.DB != 1 || s.CS.L != 0 || s.CR0&1 == 0 || s.CR0&(1<<31) != 0 || s.EFER != 0 || s.TR.Limit != 0x67 {
		t.Errorf("sregs cs=%+v cr0=%#x efer=%#x tr=%+v", s.CS, s.CR0, s.EFER, s.TR)
	}
	if u32(m, StartInfoAddr) != StartInfoMagic || u64(m, StartInfoAddr+siCmdlinePaddr) != CmdlineAddr || u32(m, StartInfoAddr+siMemmapEntries) != 4 {
		t.Error("start info")
	}
	// The fourth map entry is the RAM above 4 GiB.
	e := PVHMemmapAddr + 3*memmapEntrySize
	if u64(m, uint64(e)) != 1<<32 || u64(m, uint64(e)+8) != 2<<30 || u32(m, uint64(e)+16) != E820RAM {
		t.Error("memory map above 4 GiB")
	}
}

func TestBzImage(t *testing.T) {
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	m := newMem(t, 16<<20)
	k, err := loadFile(t, m, imgs.BzImage)
	if err != nil {
		t.Fatal(err)
	}
	if k.Format != FormatBzImage || k.Entry != 0x100200 || k.PVHEntry != 0 {
		t.Fatalf("kernel %+v", k)
	}
	elfImg := newMem(t, 16<<20)
	if _, err := loadFile(t, elfImg, imgs.ELF); err != nil {
		t.Fatal(err)
	}
	a, _ := m.Slice(0x100000, 0x1000)
	b, _ := elfImg.Slice(0x100000, 0x1000)
	if !bytes.Equal(a, b) {
		t.Error("bzImage payload differs from the ELF's code")
	}
	if _, err := Setup(m, k, Config{VCPUs: 1}); err != nil {
		t.Fatal(err)
	}
	if u32(m, ZeroPageAddr+0x214) != 0x100000 || u32(m, ZeroPageAddr+hdrVersion)&0xffff != 0x020f {
		t.Error("setup header not copied into the zero page")
	}
	if _, err := Setup(m, k, Config{VCPUs: 1, Protocol: ProtocolPVH}); !errors.Is(err, ErrNoPVH) {
		t.Errorf("PVH on a bzImage = %v", err)
	}

	raw, _ := os.ReadFile(imgs.BzImage)
	old := bytes.Clone(raw)
	binary.LittleEndian.PutUint16(old[hdrVersion:], 0x0204)
	no64 := bytes.Clone(raw)
	no64[hdrXLoadFlags] = 0
	for name, img := range map[string][]byte{"old protocol": old, "no 64-bit entry": no64, "setup only": raw[:0xA00]} {
		if _, err := LoadKernel(newMem(t, 16<<20), bytes.NewReader(img), int64(len(img))); !errors.Is(err, ErrUnsupportedKernel) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestRejects(t *testing.T) {
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	m := newMem(t, 16<<20)
	for name, img := range map[string][]byte{
		"empty":   nil,
		"garbage": bytes.Repeat([]byte("garbage!"), 512),
		"elf hdr": []byte("\x7fELF\x02\x01\x01"),
	} {
		if _, err := LoadKernel(m, bytes.NewReader(img), int64(len(img))); !errors.Is(err, ErrUnsupportedKernel) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// A kernel bigger than guest RAM.
	small := newMem(t, memory.MinSize)
	raw, _ := os.ReadFile(imgs.ELF)
	if _, err := LoadKernel(small, bytes.NewReader(raw), int64(len(raw))); err != nil {
		t.Fatalf("2 MiB fits the test guest: %v", err)
	}
	k, _ := loadFile(t, m, imgs.ELF)
	if _, err := Setup(m, k, Config{VCPUs: 1, Cmdline: strings.Repeat("x", CmdlineMax+1)}); !errors.Is(err, ErrCmdline) {
		t.Errorf("long cmdline: %v", err)
	}
	if _, err := Setup(m, k, Config{VCPUs: 1, Cmdline: "a\x00b"}); !errors.Is(err, ErrCmdline) {
		t.Errorf("NUL in cmdline: %v", err)
	}
	for _, n := range []int{0, MaxVCPUs + 1} {
		if _, err := Setup(m, k, Config{VCPUs: n}); !errors.Is(err, ErrVCPUs) {
			t.Errorf("%d vCPUs: %v", n, err)
		}
	}
}

func TestMPTable(t *testing.T) {
	m := newMem(t, 16<<20)
	if err := WriteMPTable(m, MaxVCPUs); err != nil {
		t.Fatal(err)
	}
	mpf, _ := m.Slice(MPTableAddr, mpfSize)
	if string(mpf[:4]) != "_MP_" || sum(mpf) != 0 || u32(m, MPTableAddr+4) != MPTableAddr+16 {
		t.Fatal("floating pointer")
	}
	hdr, _ := m.Slice(MPTableAddr+16, mpcHeaderSize)
	n := binary.LittleEndian.Uint16(hdr[4:])
	table, _ := m.Slice(MPTableAddr+16, uint64(n))
	if string(hdr[:4]) != "PCMP" || sum(table) != 0 || binary.LittleEndian.Uint32(hdr[36:]) != LAPICAddr {
		t.Fatal("configuration table")
	}
	if MPTableAddr+16+uint64(n) > 0xA0000 {
		t.Fatal("table leaves the EBDA")
	}
	cpus, boot := 0, 0
	for e := table[mpcHeaderSize:]; len(e) > 0; {
		if e[0] == mpEntryProcessor {
			cpus++
			if e[3]&mpCPUBootstrap != 0 {
				boot++
			}
			e = e[mpProcessorSize:]
		} else {
			e = e[mpEntrySize:]
		}
	}
	if cpus != MaxVCPUs || boot != 1 {
		t.Errorf("%d processors, %d bootstrap", cpus, boot)
	}
}

func sum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return s
}

func TestMemoryMap(t *testing.T) {
	mm := MemoryMap(memory.Layout(6 << 30))
	want := []E820Entry{
		{0, EBDAStart, E820RAM},
		{EBDAStart, 0xA0000 - EBDAStart, E820Reserved},
		{HighMemStart, memory.MMIOHoleStart - HighMemStart, E820RAM},
		{1 << 32, 3 << 30, E820RAM},
	}
	if len(mm) != len(want) {
		t.Fatalf("%+v", mm)
	}
	for i := range want {
		if mm[i] != want[i] {
			t.Errorf("entry %d = %+v, want %+v", i, mm[i], want[i])
		}
	}
}

// TestInitrd: the initrd lands page-aligned at the top of low RAM, above
// the kernel, and both boot paths announce it; one that does not fit is
// refused.
func TestInitrd(t *testing.T) {
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	rd := bytes.Repeat([]byte("070701cpio"), 1000)
	for _, proto := range []Protocol{ProtocolLinux64, ProtocolPVH} {
		t.Run(proto.String(), func(t *testing.T) {
			m := newMem(t, 64<<20)
			k, err := loadFile(t, m, imgs.ELF)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Setup(m, k, Config{VCPUs: 1, Protocol: proto, Initrd: rd}); err != nil {
				t.Fatal(err)
			}
			var addr, size uint64
			if proto == ProtocolLinux64 {
				addr = uint64(u32(m, ZeroPageAddr+hdrRamdiskImage)) | uint64(u32(m, ZeroPageAddr+bpExtRamdiskImg))<<32
				size = uint64(u32(m, ZeroPageAddr+hdrRamdiskSize)) | uint64(u32(m, ZeroPageAddr+bpExtRamdiskSz))<<32
			} else {
				if u32(m, StartInfoAddr+siNrModules) != 1 || u64(m, StartInfoAddr+siModlistPaddr) != PVHModlistAddr {
					t.Fatalf("start info lists no module")
				}
				addr, size = u64(m, PVHModlistAddr), u64(m, PVHModlistAddr+8)
			}
			if size != uint64(len(rd)) || addr%memory.PageSize != 0 || addr < k.End || addr+size > 64<<20 || 64<<20-addr-size >= memory.PageSize {
				t.Fatalf("initrd at %#x size %d (kernel ends %#x)", addr, size, k.End)
			}
			got, _ := m.Slice(addr, size)
			if !bytes.Equal(got, rd) {
				t.Fatal("initrd content differs")
			}
		})
	}
	m := newMem(t, 8<<20)
	k, err := loadFile(t, m, imgs.ELF)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Setup(m, k, Config{VCPUs: 1, Initrd: make([]byte, 7<<20)}); !errors.Is(err, ErrInitrdPlacement) {
		t.Fatalf("7 MiB initrd in 8 MiB = %v, want ErrInitrdPlacement", err)
	}
}
