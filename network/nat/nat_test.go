package nat

import (
	"errors"
	"net/netip"
	"testing"
)

// Enable and Disable against real namespaces are exercised by
// network/policy's TestEgress/NAT, which owns the fake world.

func TestOptionsRejected(t *testing.T) {
	for _, o := range []Options{
		{},
		{Pool: netip.MustParsePrefix("fd00::/64")},
		{Pool: netip.MustParsePrefix("100.96.0.0/11"), OutInterface: "a-name-far-too-long"},
	} {
		if _, err := Enable(o); !errors.Is(err, ErrBadOptions) {
			t.Errorf("Enable(%+v): %v, want ErrBadOptions", o, err)
		}
	}
}

func TestMask(t *testing.T) {
	for bits, want := range map[int][4]byte{0: {}, 11: {255, 224, 0, 0}, 30: {255, 255, 255, 252}, 32: {255, 255, 255, 255}} {
		if got := netipMask(bits); [4]byte(got) != want {
			t.Errorf("mask /%d = %v, want %v", bits, got, want)
		}
	}
}
