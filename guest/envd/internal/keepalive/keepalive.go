// Package keepalive reads the interval at which envd's server streams (process
// output, directory watches) must emit keepalive events while idle, so that
// proxies and load balancers do not cut them.
package keepalive

import (
	"net/http"
	"strconv"
	"time"
)

// Header carries the period in whole seconds; the E2B SDKs send 50.
const Header = "Keepalive-Ping-Interval"

// maxSeconds caps the period: anything longer is as good as no keepalive, and the
// cap keeps the conversion to time.Duration from overflowing.
const maxSeconds = 24 * 60 * 60

// Period returns the requested keepalive period, 0 when none (absent, malformed or
// not positive).
func Period(h http.Header) time.Duration {
	n, err := strconv.Atoi(h.Get(Header))
	if err != nil || n <= 0 {
		return 0
	}
	return time.Duration(min(n, maxSeconds)) * time.Second
}
