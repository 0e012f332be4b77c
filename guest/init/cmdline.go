package guestinit

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultHostname is the hostname until cubicle.hostname or the host's
// identity request sets another.
const DefaultHostname = "sandbox"

// maxMemoryMiB bounds cubicle.mem: 16 TiB, far above any sandbox.
const maxMemoryMiB = 16 << 20

// Params are init's parameters from the kernel command line.
type Params struct {
	// Addr is eth0's address and prefix (cubicle.ip); invalid (the zero
	// value) when absent: then only lo is configured.
	Addr netip.Prefix
	// Gateway is the default route and the nameserver (cubicle.gw).
	Gateway netip.Addr
	// MemoryMiB is the guest's memory (cubicle.mem).
	MemoryMiB int
	// Hostname is cubicle.hostname, or DefaultHostname.
	Hostname string
}

// ErrCmdline is wrapped by every command line error.
var ErrCmdline = errors.New("kernel command line")

// ParseCmdline parses the kernel command line (the content of
// /proc/cmdline) as the package doc's contract says. Words after "--" are
// init's arguments and are ignored; words without the "cubicle." prefix
// belong to the kernel. Quoting is the kernel's: a double quote toggles
// whether spaces split words, and the quotes themselves are dropped.
func ParseCmdline(cmdline string) (Params, error) {
	p := Params{Hostname: DefaultHostname}
	seen := map[string]bool{}
	for _, w := range splitCmdline(cmdline) {
		if w == "--" {
			break
		}
		key, val, hasVal := strings.Cut(w, "=")
		name, ok := strings.CutPrefix(key, "cubicle.")
		if !ok {
			continue
		}
		if seen[name] {
			return Params{}, fmt.Errorf("%w: %s given twice", ErrCmdline, key)
		}
		seen[name] = true
		if !hasVal {
			return Params{}, fmt.Errorf("%w: %s has no value", ErrCmdline, key)
		}
		switch name {
		case "ip":
			pfx, err := netip.ParsePrefix(val)
			if err != nil || !pfx.Addr().Is4() || pfx.Bits() < 1 || pfx.Bits() > 31 {
				return Params{}, fmt.Errorf("%w: cubicle.ip=%q is not an IPv4 address/prefix with a prefix of 1 to 31 bits", ErrCmdline, val)
			}
			p.Addr = pfx
		case "gw":
			a, err := netip.ParseAddr(val)
			if err != nil || !a.Is4() {
				return Params{}, fmt.Errorf("%w: cubicle.gw=%q is not an IPv4 address", ErrCmdline, val)
			}
			p.Gateway = a
		case "mem":
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 || n > maxMemoryMiB {
				return Params{}, fmt.Errorf("%w: cubicle.mem=%q is not a size in MiB from 1 to %d", ErrCmdline, val, maxMemoryMiB)
			}
			p.MemoryMiB = n
		case "hostname":
			if !ValidHostname(val) {
				return Params{}, fmt.Errorf("%w: cubicle.hostname=%q is not a hostname (1 to 64 of A-Z a-z 0-9 . -, not starting with . or -)", ErrCmdline, val)
			}
			p.Hostname = val
		default:
			return Params{}, fmt.Errorf("%w: unknown parameter %s", ErrCmdline, key)
		}
	}
	if p.MemoryMiB == 0 {
		return Params{}, fmt.Errorf("%w: cubicle.mem is missing", ErrCmdline)
	}
	switch {
	case p.Gateway.IsValid() && !p.Addr.IsValid():
		return Params{}, fmt.Errorf("%w: cubicle.gw without cubicle.ip", ErrCmdline)
	case p.Addr.IsValid() && !p.Gateway.IsValid():
		return Params{}, fmt.Errorf("%w: cubicle.ip without cubicle.gw", ErrCmdline)
	case p.Addr.IsValid() && (!p.Addr.Contains(p.Gateway) || p.Gateway == p.Addr.Addr()):
		return Params{}, fmt.Errorf("%w: cubicle.gw %s is not another address in cubicle.ip's %s", ErrCmdline, p.Gateway, p.Addr.Masked())
	}
	return p, nil
}

// splitCmdline splits a command line into words as the kernel's
// next_arg does: whitespace separates words except inside double quotes,
// which are removed.
func splitCmdline(s string) []string {
	var words []string
	var w strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			quoted = !quoted
			inWord = true
		case !quoted && (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' || c == 0):
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

// ValidHostname reports whether s is a hostname init accepts: 1 to 64 of
// [A-Za-z0-9.-], not starting with '.' or '-' (what sethostname(2) takes
// and resolvers do not choke on).
func ValidHostname(s string) bool {
	if len(s) < 1 || len(s) > 64 || s[0] == '.' || s[0] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}
