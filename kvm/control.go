package kvm

import (
	"context"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Kick bits: why a vCPU was asked to leave the guest.
const (
	kickUser  = 1 << iota // Kick, or RunContext's context ended: Run returns
	kickPause             // VM.Pause: Run parks until Resume, then goes on
	kickClose             // Close: Run returns ErrClosed
)

// VCPUState says where a vCPU is.
type VCPUState int32

const (
	// StateIdle: not in Run; the vCPU has exited to the VMM (or never ran).
	StateIdle VCPUState = iota
	// StateRunning: in Run, in the guest or about to enter it.
	StateRunning
	// StatePaused: in Run, waiting for VM.Resume.
	StatePaused
	// StateClosed: closed.
	StateClosed
)

func (s VCPUState) String() string {
	switch s {
	case StateIdle:
		return "idle"
	case StateRunning:
		return "running"
	case StatePaused:
		return "paused"
	case StateClosed:
		return "closed"
	}
	return fmt.Sprintf("VCPUState(%d)", int32(s))
}

// State returns where the vCPU is: idle (exited to the VMM), running,
// paused by VM.Pause, or closed. It does not wait for Run.
func (c *VCPU) State() VCPUState { return VCPUState(c.state.Load()) }

// Kick makes the vCPU leave the guest: a Run in progress returns promptly
// with an ExitIntr exit and a nil error, the registers (Regs) holding where
// the guest stopped; if no Run is in progress, the next Run returns that way
// at once. Running again continues the guest where it stopped. It may be
// called from any goroutine, and does not wait.
//
// It sets the run page's immediate_exit, so a KVM_RUN about to start
// returns before entering the guest, and sends SIGURG to the thread inside
// KVM_RUN, which interrupts it (the Go runtime takes SIGURG for its own
// preemption and ignores one it did not ask for).
func (c *VCPU) Kick() { c.kickWith(kickUser) }

func (c *VCPU) kickWith(bits uint32) {
	c.kmu.RLock()
	defer c.kmu.RUnlock()
	if c.run == nil {
		return
	}
	c.kick.Or(bits)
	c.run[runImmediateExit] = 1
	// Run publishes its thread before KVM_RUN and reads immediate_exit in
	// the kernel: a Run that entered before the store above has its tid
	// visible here, and one that enters after sees immediate_exit.
	if tid := c.tid.Load(); tid != 0 {
		_ = unix.Tgkill(os.Getpid(), int(tid), unix.SIGURG) // ESRCH: the thread left already
	}
}

// RunContext is Run, ended by ctx as by Kick: when ctx is done, a Run in the
// guest returns promptly with an ExitIntr exit and context.Cause(ctx). A
// context that is done already returns that at once, without entering the
// guest. A Run parked by VM.Pause also returns when ctx ends.
func (c *VCPU) RunContext(ctx context.Context) (Exit, error) {
	if ctx.Done() != nil {
		if ctx.Err() != nil {
			return Exit{Reason: ExitIntr}, context.Cause(ctx)
		}
		stop := context.AfterFunc(ctx, c.Kick)
		defer func() {
			if !stop() {
				// The kick was sent (or is being sent) for this Run, which
				// is over: it must not stop the next one.
				c.kick.And(^uint32(kickUser))
			}
		}()
	}
	for {
		if err := c.vm.enter(ctx, c); err != nil {
			return Exit{Reason: ExitIntr}, err
		}
		e, err, again := c.runOnce()
		c.vm.leave(c)
		if again {
			continue
		}
		if err == nil && e.Reason == ExitIntr && ctx.Err() != nil {
			err = context.Cause(ctx)
		}
		return e, err
	}
}

// enter waits while the VM is paused, then counts c as in the guest. It
// fails when c is closed or ctx ends meanwhile.
func (vm *VM) enter(ctx context.Context, c *VCPU) error {
	for {
		vm.pmu.Lock()
		if c.closing.Load() {
			vm.pmu.Unlock()
			return fmt.Errorf("kvm: vCPU %d: %w", c.id, errVCPUClosed)
		}
		if vm.resume == nil {
			vm.inGuest++
			c.state.Store(int32(StateRunning))
			vm.pmu.Unlock()
			return nil
		}
		resume := vm.resume
		c.state.Store(int32(StatePaused))
		vm.pmu.Unlock()
		select {
		case <-resume:
		case <-c.closed:
			return fmt.Errorf("kvm: vCPU %d: %w", c.id, errVCPUClosed)
		case <-ctx.Done():
			c.state.Store(int32(StateIdle))
			return context.Cause(ctx)
		}
	}
}

// leave counts c out of the guest and wakes a Pause waiting for it.
func (vm *VM) leave(c *VCPU) {
	vm.pmu.Lock()
	vm.inGuest--
	if !c.closing.Load() {
		c.state.Store(int32(StateIdle))
	}
	if vm.inGuest == 0 && vm.drained != nil {
		close(vm.drained)
		vm.drained = nil
	}
	vm.pmu.Unlock()
}

// Pause stops every vCPU of the VM and returns when none is in the guest:
// each Run in progress leaves the guest (as by Kick) and waits inside Run
// for Resume, and a Run started while paused waits too. Paused vCPUs' state
// is StatePaused (or StateIdle for one not in Run). Then guest memory is
// still (Save needs this) and registers can be read. It returns early with
// ctx's error if the vCPUs do not all stop in time (the VM stays paused;
// call Resume). Pausing a paused VM waits again for it to be still.
func (vm *VM) Pause(ctx context.Context) error {
	vm.mu.Lock()
	vcpus := append([]*VCPU(nil), vm.vcpus...)
	vm.mu.Unlock()
	vm.pmu.Lock()
	if vm.resume == nil {
		vm.resume = make(chan struct{})
	}
	vm.pmu.Unlock()
	for _, c := range vcpus {
		c.kickWith(kickPause)
	}
	vm.pmu.Lock()
	if vm.inGuest == 0 {
		vm.pmu.Unlock()
		return nil
	}
	if vm.drained == nil {
		vm.drained = make(chan struct{})
	}
	drained := vm.drained
	vm.pmu.Unlock()
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("kvm: Pause: vCPUs still in the guest: %w", context.Cause(ctx))
	}
}

// Resume lets the vCPUs paused by Pause run again. Resuming a VM that is not
// paused does nothing.
func (vm *VM) Resume() {
	vm.mu.Lock()
	vcpus := append([]*VCPU(nil), vm.vcpus...)
	vm.mu.Unlock()
	vm.pmu.Lock()
	defer vm.pmu.Unlock()
	if vm.resume == nil {
		return
	}
	// A pause kick that reached no Run must not stop the next one.
	for _, c := range vcpus {
		c.kick.And(^uint32(kickPause))
	}
	close(vm.resume)
	vm.resume = nil
}

// Paused reports whether the VM is paused.
func (vm *VM) Paused() bool {
	vm.pmu.Lock()
	defer vm.pmu.Unlock()
	return vm.resume != nil
}
