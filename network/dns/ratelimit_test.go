package dns

import (
	"testing"
	"time"
)

func TestBucket(t *testing.T) {
	t0 := time.Unix(1000, 0)
	b := newBucket(10, 5, t0)
	n := 0
	for range 100 {
		if ok, _ := b.take(t0); ok {
			n++
		}
	}
	if n != 5 {
		t.Errorf("burst: %d queries taken at once, want 5", n)
	}
	if _, warn := b.take(t0); warn {
		t.Error("warned twice within a minute")
	}
	// 10 per second: after 0.25 s, two tokens.
	n = 0
	for range 100 {
		if ok, _ := b.take(t0.Add(250 * time.Millisecond)); ok {
			n++
		}
	}
	if n != 2 {
		t.Errorf("after 250 ms at 10/s: %d taken, want 2", n)
	}
	// A long pause refills to the burst, not beyond: five taken, the
	// sixth refused, and warned about (the last warning is an hour old).
	n = 0
	for range 5 {
		if ok, _ := b.take(t0.Add(time.Hour)); ok {
			n++
		}
	}
	if n != 5 {
		t.Errorf("after an hour: %d taken, want the burst 5", n)
	}
	if ok, warn := b.take(t0.Add(time.Hour)); ok || !warn {
		t.Errorf("refused an hour later: ok=%v warn=%v, want a warning", ok, warn)
	}
	// A clock going backwards takes nothing extra.
	if ok, _ := b.take(t0); ok {
		t.Error("a token from a clock that went back")
	}
}
