package guestinit

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// contractCmdline is the package doc's command line with what the VMM adds.
const contractCmdline = `console=ttyS0 reboot=k panic=1 root=/dev/vda ro rootfstype=ext4 init=/.cubicle/cubicle cubicle.ip=169.254.0.21/30 cubicle.gw=169.254.0.22 cubicle.mem=512 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 -- init` + "\n"

func TestParseCmdline(t *testing.T) {
	guest := Params{
		Addr:      netip.MustParsePrefix("169.254.0.21/30"),
		Gateway:   netip.MustParseAddr("169.254.0.22"),
		MemoryMiB: 512,
		Hostname:  DefaultHostname,
	}
	withHost := guest
	withHost.Hostname = "abc123.sandbox"
	for _, tc := range []struct {
		name, cmdline string
		want          Params
		err           string // substring of the error; "" for none
	}{
		{"contract", contractCmdline, guest, ""},
		{"hostname", "cubicle.hostname=abc123.sandbox " + contractCmdline, withHost, ""},
		{"quoted", `cubicle.ip="169.254.0.21/30" cubicle.gw=169.254.0.22 cubicle.mem=512`, guest, ""},
		{"no network", "cubicle.mem=64", Params{MemoryMiB: 64, Hostname: DefaultHostname}, ""},
		{"after dashes ignored", "cubicle.mem=64 -- cubicle.bogus=1 cubicle.mem=x", Params{MemoryMiB: 64, Hostname: DefaultHostname}, ""},
		{"tabs and newlines", "\tcubicle.mem=64\n", Params{MemoryMiB: 64, Hostname: DefaultHostname}, ""},
		{"empty", "", Params{}, "cubicle.mem is missing"},
		{"no mem", "cubicle.ip=169.254.0.21/30 cubicle.gw=169.254.0.22", Params{}, "cubicle.mem is missing"},
		{"mem zero", "cubicle.mem=0", Params{}, "cubicle.mem"},
		{"mem huge", "cubicle.mem=99999999999", Params{}, "cubicle.mem"},
		{"mem text", "cubicle.mem=lots", Params{}, "cubicle.mem"},
		{"unknown key", "cubicle.mem=64 cubicle.ipv6=::1/64", Params{}, "unknown parameter cubicle.ipv6"},
		{"twice", "cubicle.mem=64 cubicle.mem=128", Params{}, "given twice"},
		{"no value", "cubicle.mem", Params{}, "has no value"},
		{"ipv6", "cubicle.mem=64 cubicle.ip=fd00::2/64 cubicle.gw=fd00::1", Params{}, "IPv4"},
		{"no prefix", "cubicle.mem=64 cubicle.ip=169.254.0.21 cubicle.gw=169.254.0.22", Params{}, "cubicle.ip"},
		{"prefix 32", "cubicle.mem=64 cubicle.ip=169.254.0.21/32 cubicle.gw=169.254.0.22", Params{}, "cubicle.ip"},
		{"gw outside", "cubicle.mem=64 cubicle.ip=169.254.0.21/30 cubicle.gw=10.0.0.1", Params{}, "not another address"},
		{"gw is ip", "cubicle.mem=64 cubicle.ip=169.254.0.21/30 cubicle.gw=169.254.0.21", Params{}, "not another address"},
		{"gw alone", "cubicle.mem=64 cubicle.gw=169.254.0.22", Params{}, "without cubicle.ip"},
		{"ip alone", "cubicle.mem=64 cubicle.ip=169.254.0.21/30", Params{}, "without cubicle.gw"},
		{"bad hostname", "cubicle.mem=64 cubicle.hostname=a/b", Params{}, "cubicle.hostname"},
		{"hostname dash", "cubicle.mem=64 cubicle.hostname=-x", Params{}, "cubicle.hostname"},
		{"hostname long", "cubicle.mem=64 cubicle.hostname=" + strings.Repeat("a", 65), Params{}, "cubicle.hostname"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseCmdline(tc.cmdline)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, ErrCmdline) {
					t.Fatalf("ParseCmdline(%q) = %+v, %v; want an ErrCmdline containing %q", tc.cmdline, got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseCmdline(%q) = %+v, %v; want %+v", tc.cmdline, got, err, tc.want)
			}
		})
	}
}

func TestSplitCmdline(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"  a  b ", []string{"a", "b"}},
		{`a="b c" d`, []string{"a=b c", "d"}},
		{`"x y"z`, []string{"x yz"}},
		{`""`, []string{""}},
		{`a="unterminated b`, []string{"a=unterminated b"}},
		{"a\x00b", []string{"a", "b"}},
	} {
		got := splitCmdline(tc.in)
		if strings.Join(got, "|") != strings.Join(tc.want, "|") || len(got) != len(tc.want) {
			t.Errorf("splitCmdline(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// FuzzParseCmdline: /proc/cmdline is input init does not control. Whatever
// it holds, ParseCmdline returns an error or parameters that keep the
// contract's invariants; it never panics.
func FuzzParseCmdline(f *testing.F) {
	for _, s := range []string{contractCmdline, "cubicle.mem=1", `cubicle.hostname="a b" cubicle.mem=2`, "cubicle.ip=1.2.3.4/31 cubicle.gw=1.2.3.5 cubicle.mem=3", "--"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseCmdline(s)
		if err != nil {
			if !errors.Is(err, ErrCmdline) {
				t.Fatalf("error %v is not an ErrCmdline", err)
			}
			return
		}
		if p.MemoryMiB < 1 || p.MemoryMiB > maxMemoryMiB || !ValidHostname(p.Hostname) {
			t.Fatalf("accepted %q as %+v", s, p)
		}
		if p.Addr.IsValid() != p.Gateway.IsValid() {
			t.Fatalf("accepted %q with only one of ip and gw: %+v", s, p)
		}
		if p.Addr.IsValid() && (!p.Addr.Addr().Is4() || !p.Addr.Contains(p.Gateway) || p.Addr.Addr() == p.Gateway) {
			t.Fatalf("accepted %q with a bad network: %+v", s, p)
		}
	})
}
