//go:build linux && amd64

// Command canboot says whether this host can boot a Linux guest on
// cubicle's VMM (linux.CanBoot): it prints "yes" and exits 0, or prints
// "no: <why>" and exits 1. scripts/nested-kvm.sh asks it whether to run
// the microVM checks directly or inside nested KVM under QEMU.
package main

import (
	"fmt"
	"os"

	"github.com/cubicle-dev/cubicle/vmm/linux"
)

func main() {
	ok, why := linux.CanBoot()
	if !ok {
		fmt.Println("no: " + why)
		os.Exit(1)
	}
	fmt.Println("yes")
}
