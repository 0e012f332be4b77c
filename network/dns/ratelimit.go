package dns

import (
	"sync"
	"time"
)

// bucket is a token bucket: it holds up to burst tokens, refilled at rate
// per second, and every query takes one. It is ours rather than
// golang.org/x/time/rate's because this is all of it that is needed.
type bucket struct {
	mu     sync.Mutex
	rate   float64 // tokens per second
	burst  float64
	tokens float64
	last   time.Time // when tokens was last brought up to date
	// warned is when the last "rate limited" warning was logged, so that
	// a flood logs once a minute, not once a query.
	warned time.Time
}

func newBucket(rate float64, burst int, now time.Time) *bucket {
	return &bucket{rate: rate, burst: float64(burst), tokens: float64(burst), last: now}
}

// take takes a token if there is one at now. warn is true when the caller
// should log that the sandbox is being limited: on a refusal, at most once
// per limitWarnEvery.
func (b *bucket) take(now time.Time) (ok, warn bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = min(b.burst, b.tokens+dt.Seconds()*b.rate)
		b.last = now
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, false
	}
	if now.Sub(b.warned) >= limitWarnEvery {
		b.warned = now
		return false, true
	}
	return false, false
}

// limitWarnEvery spaces the warnings about one rate-limited sandbox.
const limitWarnEvery = time.Minute
