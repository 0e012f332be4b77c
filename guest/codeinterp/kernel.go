package codeinterp

import (
	"context"
	"errors"
	"time"
)

// kernel is one context's interpreter.
type kernel interface {
	// run executes code with env added to the environment for its
	// duration, passing each output event to emit in order. It runs one
	// cell at a time: a second call waits for the first. When ctx ends
	// during the cell, run interrupts it and returns only once the kernel
	// is idle again (restarting a kernel that ignores interrupts), so the
	// next cell finds it usable.
	run(ctx context.Context, code string, env map[string]string, emit func(any)) error
	// setBaseEnv records variables every later cell sees (the sandbox's
	// environment from envd, which a kernel started before the sandbox was
	// handed out does not have). They are applied before the next cell.
	setBaseEnv(env map[string]string)
	// restart replaces the interpreter with a fresh one: all state is lost.
	restart(ctx context.Context) error
	// close stops the interpreter and frees what it holds.
	close() error
}

var (
	// ErrKernelDead means the interpreter process has exited.
	ErrKernelDead = errors.New("kernel is not running")
	// ErrKernelStart means an interpreter could not be started or did not
	// answer in time.
	ErrKernelStart = errors.New("kernel did not start")
	// ErrClosed means the context was removed while the call waited.
	ErrClosed = errors.New("context closed")
)

// Timing of interrupts. A cell that has not stopped interruptGrace after
// SIGINT gets another SIGINT every interruptRepeat; one still running after
// interruptLimit is ended by restarting its kernel, state and all, since a
// context that never answers again is worse.
const (
	interruptRepeat = time.Second
	interruptLimit  = 10 * time.Second
)

// cellLock serializes a kernel's cells. Unlike a sync.Mutex a waiter can
// give up when its request ends.
type cellLock chan struct{}

func newCellLock() cellLock { return make(cellLock, 1) }

func (l cellLock) lock(ctx context.Context) error {
	select {
	case l <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l cellLock) unlock() { <-l }

// timestamp is the time format of stream events' timestamp field.
func timestamp() string { return time.Now().UTC().Format(time.RFC3339Nano) }
