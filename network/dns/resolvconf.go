package dns

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"strings"
)

// UpstreamsFromResolvConf reads the "nameserver" lines of a resolv.conf
// (resolv.conf(5)), IPv4 and IPv6, each on port 53. Lines whose address
// does not parse are skipped, as the C library does; it is an error if none
// is left.
func UpstreamsFromResolvConf(path string) ([]netip.AddrPort, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dns: upstreams: %w", err)
	}
	defer f.Close()
	var ups []netip.AddrPort
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue
		}
		ups = append(ups, netip.AddrPortFrom(a.Unmap(), DefaultPort))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("dns: upstreams: reading %s: %w", path, err)
	}
	if len(ups) == 0 {
		return nil, fmt.Errorf("dns: upstreams: no nameserver in %s", path)
	}
	return ups, nil
}
