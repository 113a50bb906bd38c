package kvm

import (
	"context"
	"errors"
	"testing"
	"time"
)

// fakeVCPU is a VCPU with a run page of plain memory: enough for the kick
// and pause bookkeeping, which never calls the kernel.
func fakeVCPU(vm *VM) *VCPU {
	c := &VCPU{run: make(runPage, 4096), vm: vm, closed: make(chan struct{})}
	vm.vcpus = append(vm.vcpus, c)
	return c
}

func TestKickMarksTheRunPage(t *testing.T) {
	vm := &VM{}
	c := fakeVCPU(vm)
	c.Kick()
	if c.run[runImmediateExit] != 1 || c.kick.Load() != kickUser {
		t.Fatalf("after Kick: immediate_exit %d, bits %#x", c.run[runImmediateExit], c.kick.Load())
	}
	c.kickWith(kickPause)
	if c.kick.Load() != kickUser|kickPause {
		t.Fatalf("bits %#x; want user|pause", c.kick.Load())
	}
	// A thread that is gone is not an error.
	c.tid.Store(1 << 30)
	c.Kick()
	// After the run page is unmapped (Close), a kick does nothing.
	c.kmu.Lock()
	c.run = nil
	c.kmu.Unlock()
	c.Kick()
}

// Pause waits for every vCPU in the guest to leave, and a Run that would
// enter while paused waits for Resume; a closed vCPU or an ended context
// wakes it.
func TestPauseWaitsForTheGuestAndHoldsNewRuns(t *testing.T) {
	vm := &VM{}
	a, b := fakeVCPU(vm), fakeVCPU(vm)
	ctx := context.Background()
	if err := vm.enter(ctx, a); err != nil || a.State() != StateRunning {
		t.Fatalf("enter: %v, state %v", err, a.State())
	}
	paused := make(chan error, 1)
	go func() { paused <- vm.Pause(ctx) }()
	select {
	case err := <-paused:
		t.Fatalf("Pause returned (%v) with a vCPU in the guest", err)
	case <-time.After(50 * time.Millisecond):
	}
	if a.kick.Load()&kickPause == 0 {
		t.Fatal("Pause did not kick the vCPU in the guest")
	}
	vm.leave(a)
	if err := <-paused; err != nil {
		t.Fatal(err)
	}
	if !vm.Paused() {
		t.Fatal("not paused")
	}
	// b tries to enter: it waits, paused.
	entered := make(chan error, 1)
	go func() { entered <- vm.enter(ctx, b) }()
	deadline := time.Now().Add(5 * time.Second)
	for b.State() != StatePaused && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if b.State() != StatePaused {
		t.Fatalf("b is %v; want paused", b.State())
	}
	// Pausing again while still returns at once.
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	vm.Resume()
	if err := <-entered; err != nil || b.State() != StateRunning {
		t.Fatalf("after Resume: %v, %v", err, b.State())
	}
	if a.kick.Load()&kickPause != 0 {
		t.Fatal("Resume left a pause kick that would stop a's next Run")
	}
	vm.leave(b)

	// A Pause that cannot finish ends with its context; the VM stays paused.
	if err := vm.enter(ctx, a); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := vm.Pause(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Pause with a vCPU that never leaves: %v", err)
	}
	vm.leave(a)
	// While paused, an ended context or Close wakes a waiting enter.
	gone, cancel2 := context.WithCancel(ctx)
	go func() { time.Sleep(10 * time.Millisecond); cancel2() }()
	if err := vm.enter(gone, b); !errors.Is(err, context.Canceled) {
		t.Fatalf("enter with an ended context: %v", err)
	}
	go func() { time.Sleep(10 * time.Millisecond); b.closing.Store(true); close(b.closed) }()
	if err := vm.enter(ctx, b); !errors.Is(err, ErrClosed) {
		t.Fatalf("enter of a closed vCPU: %v", err)
	}
	vm.Resume()
	vm.Resume() // not paused: nothing
}
