package virtio

import (
	"errors"
	"testing"
)

func TestGuestMemorySlice(t *testing.T) {
	low, high := make([]byte, 4096), make([]byte, 4096)
	m, err := NewGuestMemory(Region{GPA: 1 << 32, Data: high}, Region{GPA: 0, Data: low})
	if err != nil {
		t.Fatal(err)
	}
	if m.Size() != 8192 {
		t.Fatalf("Size = %d", m.Size())
	}
	for _, tc := range []struct {
		gpa, n uint64
		ok     bool
	}{
		{0, 4096, true},
		{4095, 1, true},
		{4096, 0, true},
		{4096, 1, false},
		{4000, 200, false},
		{1 << 32, 4096, true},
		{1<<32 - 1, 2, false},
		{1<<32 + 4096, 1, false},
		{^uint64(0), 2, false},
		{16, ^uint64(0), false},
		{1 << 40, 0, false},
	} {
		b, err := m.Slice(tc.gpa, tc.n)
		if (err == nil) != tc.ok {
			t.Errorf("Slice(%#x, %#x) err = %v, want ok=%v", tc.gpa, tc.n, err, tc.ok)
			continue
		}
		if err != nil && !errors.Is(err, ErrOutOfBounds) {
			t.Errorf("Slice(%#x, %#x) err = %v, want ErrOutOfBounds", tc.gpa, tc.n, err)
		}
		if err == nil && (uint64(len(b)) != tc.n || cap(b) != len(b)) {
			t.Errorf("Slice(%#x, %#x) len %d cap %d", tc.gpa, tc.n, len(b), cap(b))
		}
	}
	b, _ := m.Slice(1<<32+8, 1)
	b[0] = 7
	if high[8] != 7 {
		t.Fatal("slice does not alias guest memory")
	}
}

func TestGuestMemoryAdjacentRegions(t *testing.T) {
	a, b := make([]byte, 16), make([]byte, 16)
	m, err := NewGuestMemory(Region{GPA: 0, Data: a}, Region{GPA: 16, Data: b})
	if err != nil {
		t.Fatal(err)
	}
	if s, err := m.Slice(16, 4); err != nil || &s[0] != &b[0] {
		t.Fatalf("Slice at the start of the second region: %v", err)
	}
	if _, err := m.Slice(12, 8); err == nil {
		t.Fatal("a range across two regions was accepted")
	}
}

func TestNewGuestMemoryRejects(t *testing.T) {
	for name, rs := range map[string][]Region{
		"none":    nil,
		"empty":   {{GPA: 0, Data: nil}},
		"overlap": {{GPA: 0, Data: make([]byte, 32)}, {GPA: 16, Data: make([]byte, 32)}},
		"wraps":   {{GPA: ^uint64(0) - 3, Data: make([]byte, 32)}},
	} {
		if _, err := NewGuestMemory(rs...); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestKicks(t *testing.T) {
	k := NewKicks()
	k.Kick(0)
	k.Kick(2)
	k.Kick(99) // ignored
	<-k.C()
	if got := k.Take(); got != 0b101 {
		t.Fatalf("Take = %b", got)
	}
	select {
	case <-k.C():
		t.Fatal("spurious wakeup")
	default:
	}
}
