//go:build linux && amd64

package microvm

import (
	"bufio"
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// peer answers CONNECT like the VMM's hybrid vsock and then replies to
// each request line with answer(line), as a misbehaving guest might.
func peer(t *testing.T, answer func(string) string) string {
	uds, _ := closingPeer(t, 0, answer)
	return uds
}

// TestGuestChannelBadAnswers: what a guest sends back on the control
// channel is untrusted: a flood, garbage or a refusal is an ErrGuest
// error naming the request, never a hang or unbounded memory.
func TestGuestChannelBadAnswers(t *testing.T) {
	for _, tc := range []struct {
		name, answer, msg string
	}{
		{"flood", strings.Repeat("x", 1<<20) + "\n", "longer than"},
		{"garbage", "not json\n", "malformed answer"},
		{"refusal", `{"ok":false,"error":"no entropy for you"}` + "\n", "identity: refused: no entropy for you"},
		{"silence", "", "timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			uds := peer(t, func(string) string { return tc.answer })
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			g, err := dialGuest(ctx, uds)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			err = g.identity(ctx, "")
			if !errors.Is(err, ErrGuest) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want ErrGuest saying %q", err, tc.msg)
			}
		})
	}
	t.Run("ok", func(t *testing.T) {
		lines := make(chan string, 1)
		uds := peer(t, func(l string) string { lines <- l; return `{"ok":true}` + "\n" })
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		g, err := dialGuest(ctx, uds)
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		if err := g.identity(ctx, "sb1"); err != nil {
			t.Fatal(err)
		}
		got := <-lines
		for _, want := range []string{`"op":"identity"`, `"unixNano":`, `"entropy":"`, `"hostname":"sb1"`} {
			if !strings.Contains(got, want) {
				t.Errorf("request %s lacks %s", got, want)
			}
		}
	})
}

// closingPeer is peer that first closes `closes` CONNECTs unanswered, as
// the VMM's vsock device does when the guest resets the connection; it
// counts the connections.
func closingPeer(t *testing.T, closes int, answer func(string) string) (string, *atomic.Int32) {
	t.Helper()
	uds := filepath.Join(t.TempDir(), "v.sock")
	ln, err := net.Listen("unix", uds)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			i := n.Add(1)
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				if l, _ := r.ReadString('\n'); l != "CONNECT 1024\n" || int(i) <= closes {
					return
				}
				c.Write([]byte("OK 1073741824\n"))
				for {
					l, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := c.Write([]byte(answer(strings.TrimSpace(l)))); err != nil {
						return
					}
				}
			}()
		}
	}()
	return uds, &n
}

// TestDialGuestClosedConnect: a CONNECT the device closes unanswered is
// made again (the restore case docs/STATUS.md describes), a bounded
// number of times, and then is an ErrGuest error.
func TestDialGuestClosedConnect(t *testing.T) {
	for _, tc := range []struct {
		closes, want int
		ok           bool
	}{
		{0, 1, true},
		{1, 2, true},
		{4, 5, true},
		{100, 5, false},
	} {
		uds, n := closingPeer(t, tc.closes, func(string) string { return "" })
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		g, err := dialGuest(ctx, uds)
		cancel()
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrGuest)) {
			t.Errorf("%d closed: %v", tc.closes, err)
		}
		if g != nil {
			g.Close()
		}
		if got := int(n.Load()); got != tc.want {
			t.Errorf("%d closed: %d CONNECTs, want %d", tc.closes, got, tc.want)
		}
	}
}
