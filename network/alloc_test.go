package network

import (
	"errors"
	"net/netip"
	"testing"
)

func TestAllocator(t *testing.T) {
	type step struct {
		op      string // "alloc", "free", "restore", "reserve", "assign", "release"
		id      string
		idx     int   // restore, assign, release: slot to claim; alloc, reserve: slot expected
		wantErr error // nil for success
	}
	tests := []struct {
		name   string
		prefix string
		steps  []step
	}{
		{"hands out slots in order", "10.0.0.0/28", []step{
			{"alloc", "a", 0, nil}, {"alloc", "b", 1, nil}, {"alloc", "c", 2, nil}, {"alloc", "d", 3, nil},
		}},
		{"exhaustion", "10.0.0.0/29", []step{
			{"alloc", "a", 0, nil}, {"alloc", "b", 1, nil}, {"alloc", "c", 0, ErrExhausted},
		}},
		{"reuse after free", "10.0.0.0/29", []step{
			{"alloc", "a", 0, nil}, {"alloc", "b", 1, nil}, {"free", "a", 0, nil}, {"alloc", "c", 0, nil},
			{"alloc", "d", 0, ErrExhausted},
		}},
		{"freed slot rests while others are free", "10.0.0.0/28", []step{
			{"alloc", "a", 0, nil}, {"free", "a", 0, nil}, {"alloc", "b", 1, nil}, {"alloc", "c", 2, nil},
		}},
		{"duplicate id", "10.0.0.0/28", []step{
			{"alloc", "a", 0, nil}, {"alloc", "a", 0, ErrInUse},
		}},
		{"restore from state then allocate around it", "10.0.0.0/28", []step{
			{"restore", "a", 2, nil}, {"restore", "b", 0, nil}, {"alloc", "c", 3, nil}, {"alloc", "d", 1, nil},
			{"alloc", "e", 0, ErrExhausted},
		}},
		{"restore conflict", "10.0.0.0/28", []step{
			{"restore", "a", 1, nil}, {"restore", "b", 1, ErrInUse}, {"restore", "a", 2, ErrInUse},
		}},
		{"restore outside prefix", "10.0.0.0/28", []step{
			{"restore", "a", 4, ErrBadPrefix},
		}},
		{"free unknown is a no-op", "10.0.0.0/30", []step{
			{"free", "nobody", 0, nil}, {"alloc", "a", 0, nil},
		}},
		{"reserved slots count against the prefix", "10.0.0.0/29", []step{
			{"reserve", "", 0, nil}, {"alloc", "a", 1, nil}, {"reserve", "", 0, ErrExhausted}, {"alloc", "b", 0, ErrExhausted},
		}},
		{"assign a reserved slot", "10.0.0.0/28", []step{
			{"reserve", "", 0, nil}, {"reserve", "", 1, nil}, {"assign", "a", 1, nil}, {"lookup", "a", 1, nil},
			{"alloc", "a", 0, ErrInUse}, {"assign", "a", 0, ErrInUse},
		}},
		{"assign only what is reserved", "10.0.0.0/28", []step{
			{"alloc", "a", 0, nil}, {"assign", "b", 0, errNotReserved}, {"assign", "b", 3, errNotReserved},
		}},
		{"release frees a reservation, not an allocation", "10.0.0.0/29", []step{
			{"reserve", "", 0, nil}, {"alloc", "a", 1, nil}, {"release", "", 1, nil}, {"lookup", "a", 1, nil},
			{"release", "", 0, nil}, {"alloc", "b", 0, nil},
		}},
		{"free after assign frees the slot", "10.0.0.0/30", []step{
			{"reserve", "", 0, nil}, {"assign", "a", 0, nil}, {"free", "a", 0, nil}, {"alloc", "b", 0, nil},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := newAllocator(netip.MustParsePrefix(tt.prefix))
			if err != nil {
				t.Fatal(err)
			}
			for i, s := range tt.steps {
				switch s.op {
				case "alloc":
					idx, err := a.alloc(s.id)
					if !errors.Is(err, s.wantErr) {
						t.Fatalf("step %d alloc(%s): err %v, want %v", i, s.id, err, s.wantErr)
					}
					if err == nil && idx != s.idx {
						t.Fatalf("step %d alloc(%s) = slot %d, want %d", i, s.id, idx, s.idx)
					}
				case "free":
					a.free(s.id)
					if _, ok := a.lookup(s.id); ok {
						t.Fatalf("step %d: %s still allocated after free", i, s.id)
					}
				case "restore":
					if err := a.restore(s.id, s.idx); !errors.Is(err, s.wantErr) {
						t.Fatalf("step %d restore(%s, %d): err %v, want %v", i, s.id, s.idx, err, s.wantErr)
					}
				case "reserve":
					idx, err := a.reserve()
					if !errors.Is(err, s.wantErr) {
						t.Fatalf("step %d reserve: err %v, want %v", i, err, s.wantErr)
					}
					if err == nil && idx != s.idx {
						t.Fatalf("step %d reserve = slot %d, want %d", i, idx, s.idx)
					}
				case "assign":
					if err := a.assign(s.idx, s.id); !errors.Is(err, s.wantErr) {
						t.Fatalf("step %d assign(%d, %s): err %v, want %v", i, s.idx, s.id, err, s.wantErr)
					}
				case "release":
					a.release(s.idx)
				case "lookup":
					if idx, ok := a.lookup(s.id); !ok || idx != s.idx {
						t.Fatalf("step %d lookup(%s) = %d, %v; want %d", i, s.id, idx, ok, s.idx)
					}
				default:
					t.Fatalf("step %d: unknown op %q", i, s.op)
				}
			}
		})
	}
}

func TestAllocatorAddresses(t *testing.T) {
	a, err := newAllocator(DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if a.slots != 1<<19 {
		t.Fatalf("a /11 holds %d /30s, want %d", a.slots, 1<<19)
	}
	for _, tt := range []struct {
		idx  int
		want string
	}{{0, "100.96.0.0/30"}, {1, "100.96.0.4/30"}, {64, "100.96.1.0/30"}, {1<<19 - 1, "100.127.255.252/30"}} {
		if got := a.subnet(tt.idx).String(); got != tt.want {
			t.Errorf("subnet(%d) = %s, want %s", tt.idx, got, tt.want)
		}
	}
}

func TestNewAllocatorRejects(t *testing.T) {
	for _, p := range []string{"10.0.0.0/31", "10.0.0.1/24", "fd00::/64"} {
		if _, err := newAllocator(netip.MustParsePrefix(p)); !errors.Is(err, ErrBadPrefix) {
			t.Errorf("newAllocator(%s): err %v, want ErrBadPrefix", p, err)
		}
	}
	if _, err := newAllocator(netip.Prefix{}); !errors.Is(err, ErrBadPrefix) {
		t.Errorf("newAllocator(zero): err %v, want ErrBadPrefix", err)
	}
}

func TestCheckOverlap(t *testing.T) {
	pool := netip.MustParsePrefix("100.96.0.0/11")
	nets := func(ps ...string) []hostNet {
		var out []hostNet
		for _, p := range ps {
			out = append(out, hostNet{netip.MustParsePrefix(p), "test"})
		}
		return out
	}
	tests := []struct {
		name    string
		used    []hostNet
		overlap bool
	}{
		{"disjoint", nets("192.0.2.0/24", "127.0.0.0/8", "10.0.0.0/8"), false},
		{"default route ignored", nets("0.0.0.0/0"), false},
		{"adjacent below", nets("100.64.0.0/11"), false},
		{"adjacent above", nets("100.128.0.0/10"), false},
		{"inside the pool", nets("100.100.1.0/24"), true},
		{"host address inside", nets("100.127.255.255/32"), true},
		{"covering route", nets("100.64.0.0/10"), true},
		{"one of many", nets("10.0.0.0/8", "100.96.0.0/30"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkOverlap(pool, tt.used)
			if got := errors.Is(err, ErrPrefixOverlap); got != tt.overlap {
				t.Fatalf("checkOverlap: err %v, want overlap=%v", err, tt.overlap)
			}
			var oe *OverlapError
			if tt.overlap && (!errors.As(err, &oe) || len(oe.Overlaps) == 0) {
				t.Fatalf("error %v does not say what overlaps", err)
			}
		})
	}
}

// TestOptionsCheck: what NewPool refuses, Check refuses too, without root
// and without touching the host (a server checks its flags with it first).
func TestOptionsCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		want error
	}{
		{"defaults", Options{}, nil},
		{"e2e's", Options{Prefix: netip.MustParsePrefix("100.90.0.0/16"), LinkPrefix: "cbe", Spares: 8}, nil},
		{"digit in link prefix", Options{LinkPrefix: "rel2"}, ErrBadPrefix},
		{"upper case link prefix", Options{LinkPrefix: "Cb"}, ErrBadPrefix},
		{"names over IFNAMSIZ", Options{LinkPrefix: "muchtoolongname"}, ErrBadPrefix},
		{"host bits set", Options{Prefix: netip.MustParsePrefix("100.90.0.1/16")}, ErrBadPrefix},
		{"IPv6 prefix", Options{Prefix: netip.MustParsePrefix("fd00::/64")}, ErrBadPrefix},
		{"smaller than a /30", Options{Prefix: netip.MustParsePrefix("100.90.0.0/31")}, ErrBadPrefix},
		{"negative spares", Options{Spares: -1}, ErrBadOptions},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.opts.Check()
			if (tc.want == nil) != (err == nil) || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("Check() = %v, want %v", err, tc.want)
			}
		})
	}
}
