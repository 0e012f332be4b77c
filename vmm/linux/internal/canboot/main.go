//go:build linux && amd64

// Command canboot says what this host's /dev/kvm can run on cubicle's
// VMM. With no argument: whether it can boot a Linux guest
// (linux.CanBoot: hardware virtualization, not PVM). With -kvm: whether
// the VMM can use it at all (kvm.Open: the device, its API version and
// the capabilities the VMM needs; PVM is enough for the freestanding test
// guest). It prints "yes" and exits 0, or prints "no: <why>" and exits 1.
// scripts/nested-kvm.sh asks it which tests the host runs itself and
// which go inside nested KVM under QEMU.
package main

import (
	"fmt"
	"os"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/linux"
)

func main() {
	var ok bool
	var why string
	switch {
	case len(os.Args) == 1:
		ok, why = linux.CanBoot()
	case len(os.Args) == 2 && os.Args[1] == "-kvm":
		sys, err := kvm.Open()
		if err == nil {
			sys.Close()
			ok = true
		} else {
			why = fmt.Sprintf("no usable KVM: %v", err)
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: canboot [-kvm]")
		os.Exit(2)
	}
	if !ok {
		fmt.Println("no: " + why)
		os.Exit(1)
	}
	fmt.Println("yes")
}
