package keepalive

import (
	"net/http"
	"testing"
	"time"
)

func TestPeriod(t *testing.T) {
	tests := map[string]time.Duration{
		"":            0,
		"50":          50 * time.Second,
		"1":           time.Second,
		"0":           0,
		"-5":          0,
		"1.5":         0,
		"abc":         0,
		"99999999999": 24 * time.Hour,
	}
	for in, want := range tests {
		h := http.Header{}
		if in != "" {
			h.Set(Header, in)
		}
		if got := Period(h); got != want {
			t.Errorf("Period(%q) = %v, want %v", in, got, want)
		}
	}
}
