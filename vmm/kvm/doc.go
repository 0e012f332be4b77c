// Package kvm is cubicle's thin, typed layer over the Linux KVM API
// (/dev/kvm): the system handle, virtual machines, vCPUs, memory slots, the
// in-kernel interrupt controllers, eventfd plumbing and every get/set state
// ioctl that a snapshot needs. It contains no policy: what to create, in
// which order, and what to do on an exit is decided by package vmm.
//
// Struct layouts mirror the x86-64 uapi headers <linux/kvm.h> and
// <asm/kvm.h> byte for byte; each type names the C struct it mirrors and
// layout_test.go checks sizes and offsets (against gcc when available).
//
// # Threads
//
// All methods may be called from any goroutine; the kernel serialises
// ioctls on one vCPU. The one rule KVM imposes is on KVM_RUN: a vCPU must
// always be run from the same OS thread, because the first KVM_RUN from a
// new thread re-assigns the vCPU's pid and waits for an RCU grace period
// (milliseconds). Callers run each vCPU from a goroutine that holds
// runtime.LockOSThread for the vCPU's lifetime.
package kvm
