// Command faults runs inside the orchestrator tests' sandboxes and makes
// them fail the ways users' programs do (the test root filesystem has no
// shell or coreutils):
//
//	faults alloc MIB      allocate and touch MIB MiB, then sleep
//	faults kill PID SIG   kill(2) PID with signal number SIG
//	faults resolve NAME   look NAME's IPv4 addresses up through the
//	                      sandbox's /etc/resolv.conf; print them, or the error
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		os.Exit(1)
	}
}

var ballast [][]byte

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: faults alloc MIB | faults kill PID SIG | faults resolve NAME")
	}
	switch args[0] {
	case "alloc":
		mb, err := strconv.Atoi(args[1])
		if err != nil {
			return err
		}
		for i := 0; i < mb; i++ {
			b := make([]byte, 1<<20)
			for j := 0; j < len(b); j += 4096 {
				b[j] = 1
			}
			ballast = append(ballast, b)
		}
		fmt.Println("allocated", mb, "MiB")
		time.Sleep(time.Hour)
	case "kill":
		if len(args) != 3 {
			return fmt.Errorf("usage: faults kill PID SIG")
		}
		pid, err := strconv.Atoi(args[1])
		if err != nil {
			return err
		}
		sig, err := strconv.Atoi(args[2])
		if err != nil {
			return err
		}
		if err := syscall.Kill(pid, syscall.Signal(sig)); err != nil {
			return fmt.Errorf("kill(%d, %d): %w", pid, sig, err)
		}
		// Give the signal time to land before reporting: a killed PID 1
		// takes this process with it, which is the point.
		time.Sleep(2 * time.Second)
		fmt.Println("signal sent; still alive")
	case "resolve":
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		addrs, err := (&net.Resolver{PreferGo: true}).LookupNetIP(ctx, "ip4", args[1])
		if err != nil {
			return err
		}
		fmt.Println("resolved", addrs)
	default:
		return fmt.Errorf("unknown fault %q", args[0])
	}
	return nil
}
