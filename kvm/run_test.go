//go:build amd64

package kvm_test

import (
	"encoding/binary"
	"errors"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
	"golang.org/x/sys/unix"
)

func machine(t *testing.T, vm *kvm.VM) *guest.Machine {
	t.Helper()
	m, err := guest.New(vm, guest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
	})
	return m
}

// countLoop counts RCX down to zero, adding RBX to RAX each time, then
// reports on PortDone and halts.
func countLoop() *guest.Asm {
	a := &guest.Asm{}
	a.Label("loop")
	a.Add(guest.RAX, guest.RBX)
	a.Dec(guest.RCX)
	a.Jnz("loop")
	a.Out(guest.PortDone)
	a.Hlt()
	return a
}

// TestRunSignalsAreInvisible sends a stream of signals to the thread that
// is in KVM_RUN. Each interrupts it (EINTR, KVM_EXIT_INTR); Run enters the
// guest again, so the caller sees only the program's own exits, and the
// guest loses and repeats no instruction: the count comes out exact.
func TestRunSignalsAreInvisible(t *testing.T) {
	vm := testenv.VM(t)
	m := machine(t, vm)
	prog, err := m.LoadAsm(countLoop())
	if err != nil {
		t.Fatal(err)
	}
	const n = 200_000 // about 0.6 s where KVM emulates every instruction
	tids := make(chan int)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tid := <-tids
		for {
			select {
			case <-done:
				return
			case <-time.After(100 * time.Microsecond):
				// SIGURG is the signal the Go runtime itself uses to
				// preempt goroutines; its handler ignores extra ones.
				if err := unix.Tgkill(unix.Getpid(), tid, unix.SIGURG); err != nil {
					t.Error(err)
					return
				}
			}
		}
	})
	defer wg.Wait()
	defer close(done)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tids <- unix.Gettid()
	deadline := time.Now().Add(10 * time.Second)
	calls := 0
	for m.CPU.Interrupted() < 10 && time.Now().Before(deadline) {
		res, err := m.Call(prog, kvm.Regs{RCX: n, RBX: 3}, guest.Handlers{})
		calls++
		if err != nil {
			t.Fatal(err)
		}
		if res.Regs.RAX != 3*n || res.Regs.RCX != 0 || len(res.Outs) != 1 || res.Outs[0].Port != guest.PortDone {
			t.Fatalf("call %d: RAX %d (want %d), RCX %d, outs %+v", calls, res.Regs.RAX, 3*n, res.Regs.RCX, res.Outs)
		}
		// The program's exits are one OUT and one HLT; signals add none.
		if res.Exits != 2 {
			t.Fatalf("call %d: %d exits seen by the caller, want 2", calls, res.Exits)
		}
	}
	t.Logf("%d calls, KVM_RUN interrupted %d times", calls, m.CPU.Interrupted())
	if m.CPU.Interrupted() == 0 {
		t.Fatal("no signal ever interrupted KVM_RUN: the retry was not exercised")
	}
}

// loadAt is a program that loads the quadword at RSI into RAX, then
// reports RAX on PortLo.
func loadAt() *guest.Asm {
	a := &guest.Asm{}
	a.Load(guest.RAX, guest.RSI)
	a.Out(guest.PortLo)
	a.Hlt()
	return a
}

// TestCompleteFinishesAbandonedExit: after an MMIO read exit, Complete
// applies the answer (RAX gets it, RIP moves past the load) without running
// the next instruction; a later program then runs from the RIP it is given.
func TestCompleteFinishesAbandonedExit(t *testing.T) {
	vm := testenv.VM(t)
	m := machine(t, vm)
	prog, err := m.LoadAsm(loadAt())
	if err != nil {
		t.Fatal(err)
	}
	const gap = 0xd000_0000 // no slot there
	errStop := errors.New("stop here")
	_, err = m.Call(prog, kvm.Regs{RSI: gap}, guest.Handlers{MMIO: func(e *kvm.MMIOExit) error {
		if e.Write || e.Addr != gap || e.Len != 8 {
			t.Errorf("unexpected exit %+v", *e)
		}
		binary.LittleEndian.PutUint64(e.Data, 0x1234_5678_9abc)
		return errStop
	}})
	if !errors.Is(err, errStop) {
		t.Fatalf("Call: %v", err)
	}
	before, err := m.CPU.Regs()
	if err != nil {
		t.Fatal(err)
	}
	if err := m.CPU.Complete(); err != nil {
		t.Fatal(err)
	}
	after, err := m.CPU.Regs()
	if err != nil {
		t.Fatal(err)
	}
	if after.RAX != 0x1234_5678_9abc {
		t.Errorf("RAX after Complete = %#x, want the MMIO answer", after.RAX)
	}
	if after.RIP <= before.RIP || after.RIP > before.RIP+8 {
		t.Errorf("RIP %#x -> %#x: want just past the load", before.RIP, after.RIP)
	}
	// Nothing pending now: Complete again changes nothing.
	if err := m.CPU.Complete(); err != nil {
		t.Fatal(err)
	}
	if again, _ := m.CPU.Regs(); again != after {
		t.Errorf("second Complete changed registers: %+v", again)
	}
}

// TestRegsRoundTrip: SetRegs and SetSregs take, and Regs and Sregs give
// back, the values.
func TestRegsRoundTrip(t *testing.T) {
	vm := testenv.VM(t)
	m := machine(t, vm)
	want := kvm.Regs{RAX: 1, RBX: 2, RCX: 3, RDX: 4, RSI: 5, RDI: 6, RSP: 7, RBP: 8, R8: 9, R9: 10, R10: 11, R11: 12,
		R12: 13, R13: 14, R14: 15, R15: 16, RIP: 0x1000, RFLAGS: 0x202}
	if err := m.CPU.SetRegs(want); err != nil {
		t.Fatal(err)
	}
	if got, err := m.CPU.Regs(); err != nil || got != want {
		t.Fatalf("Regs = %+v, %v; want %+v", got, err, want)
	}
	s, err := m.CPU.Sregs()
	if err != nil {
		t.Fatal(err)
	}
	if s.EFER&(1<<10) == 0 || s.CR0&(1<<31) == 0 || s.CS.L != 1 {
		t.Fatalf("the Machine's vCPU is not in long mode: EFER %#x CR0 %#x CS %+v", s.EFER, s.CR0, s.CS)
	}
	s.CR2 = 0xdead000
	if err := m.CPU.SetSregs(s); err != nil {
		t.Fatal(err)
	}
	if got, err := m.CPU.Sregs(); err != nil || got.CR2 != 0xdead000 {
		t.Fatalf("CR2 = %#x, %v", got.CR2, err)
	}
}
