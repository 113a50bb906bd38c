//go:build amd64

package tests

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/kvm"
)

// spinner readies a guest that spins for n iterations (two instructions
// each). Tests that kick or stop it pass an n no host finishes in a test's
// time: KVM's emulator runs about a million instructions a second, hardware
// a few billion.
func spinner(t *testing.T, n uint64) (*guest.Machine, uint64) {
	t.Helper()
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: 2 * mib}})
	mach := vmWith(t, m)
	at, err := mach.LoadAsm(guest.Spin())
	require.NoError(t, err)
	require.NoError(t, mach.Start(at, kvm.Regs{RCX: n}))
	return mach, at
}

// runToHalt runs until HLT, through kicks and the program's PortDone.
func runToHalt(t *testing.T, c *kvm.VCPU) {
	t.Helper()
	for {
		e, err := c.Run()
		require.NoError(t, err)
		switch {
		case e.Reason == kvm.ExitHLT:
			return
		case e.Reason == kvm.ExitIO && e.IO.Out && e.IO.Port == guest.PortDone:
		default:
			require.Equal(t, kvm.ExitIntr, e.Reason, "unexpected exit %v", e)
		}
	}
}

// A guest spinning in a loop is kicked from another goroutine: Run returns
// promptly with an ExitIntr exit and the registers of where it stopped;
// running again continues the loop to its end.
func TestKickSpinningGuest(t *testing.T) {
	noLeaks(t)
	const n = 1 << 62 // years even on hardware: far longer than the kick takes
	mach, at := spinner(t, n)
	c := mach.CPU
	require.Equal(t, kvm.StateIdle, c.State())
	go func() {
		for c.State() != kvm.StateRunning {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond)
		c.Kick()
	}()
	start := time.Now()
	e, err := c.Run()
	require.NoError(t, err)
	require.Equal(t, kvm.ExitIntr, e.Reason)
	t.Logf("kicked after %v", time.Since(start))
	regs, err := c.Regs()
	require.NoError(t, err)
	require.Greater(t, regs.RCX, uint64(0), "stopped inside the loop")
	require.Less(t, regs.RCX, uint64(n), "after it began")
	require.GreaterOrEqual(t, regs.RIP, at)
	require.Less(t, regs.RIP, at+16)
	require.Equal(t, kvm.StateIdle, c.State())

	// A kick with no Run in progress stops the next one at once.
	c.Kick()
	e, err = c.Run()
	require.NoError(t, err)
	require.Equal(t, kvm.ExitIntr, e.Reason)
	again, err := c.Regs()
	require.NoError(t, err)
	require.Equal(t, regs.RCX, again.RCX, "the pending kick ran no instruction")

	// Resume with fewer iterations left, so the test ends soon.
	regs.RCX = 1000
	require.NoError(t, c.SetRegs(regs))
	runToHalt(t, c)
	regs, err = c.Regs()
	require.NoError(t, err)
	require.Zero(t, regs.RCX, "the loop ran to its end")
}

// RunContext: a context that ends stops the guest with its cause.
func TestRunContextStopsTheGuest(t *testing.T) {
	noLeaks(t)
	mach, _ := spinner(t, 1<<62)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	e, err := mach.CPU.RunContext(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Equal(t, kvm.ExitIntr, e.Reason)
	// A done context does not enter the guest, and a finished one does not
	// stop the next Run.
	_, err = mach.CPU.RunContext(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	regs, err := mach.CPU.Regs()
	require.NoError(t, err)
	regs.RCX = 1000
	require.NoError(t, mach.CPU.SetRegs(regs))
	runToHalt(t, mach.CPU)
}

// countUntil adds one to the quadword at RBX until the quadword at RSI
// differs from RDI, then halts: a guest that keeps writing guest memory for
// as long as the host likes, on any host's speed.
func countUntil() *guest.Asm {
	a := &guest.Asm{}
	a.Label("loop")
	a.Load(guest.RAX, guest.RBX)
	a.AddImm(guest.RAX, 1)
	a.Store(guest.RBX, guest.RAX)
	a.Load(guest.RDX, guest.RSI)
	a.Cmp(guest.RDX, guest.RDI)
	a.Jz("loop")
	a.Out(guest.PortDone)
	a.Hlt()
	return a
}

// Pause stops the vCPU with guest memory still; Save then sees a state that
// does not move; Resume lets the guest go on counting from where it stopped
// until the host tells it to halt.
func TestPauseSaveResume(t *testing.T) {
	noLeaks(t)
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: 4 * mib}}, guestmem.WithMemfd())
	mach := vmWith(t, m)
	at, err := mach.LoadAsm(countUntil())
	require.NoError(t, err)
	const counter, stop = 3 * mib, 3*mib + 4096
	require.NoError(t, mach.Start(at, kvm.Regs{RBX: counter, RSI: stop}))
	done := make(chan error, 1)
	go func() {
		for {
			e, err := mach.CPU.Run()
			if err != nil || e.Reason == kvm.ExitHLT {
				done <- err
				return
			}
			if e.Reason != kvm.ExitIntr && e.Reason != kvm.ExitIO {
				done <- errors.New("unexpected exit " + e.String())
				return
			}
		}
	}()
	for v, _ := m.ReadUint64(counter); v < 1000; v, _ = m.ReadUint64(counter) {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, mach.VM.Pause(ctx))
	require.True(t, mach.VM.Paused())
	require.Eventually(t, func() bool { return mach.CPU.State() == kvm.StatePaused }, 5*time.Second, time.Millisecond)
	before, err := m.ReadUint64(counter)
	require.NoError(t, err)
	_, err = m.Save(context.Background(), io.Discard, guestmem.SaveOptions{})
	require.NoError(t, err)
	time.Sleep(50 * time.Millisecond)
	after, err := m.ReadUint64(counter)
	require.NoError(t, err)
	require.Equal(t, before, after, "no guest write while paused")
	mach.VM.Resume()
	require.Eventually(t, func() bool {
		v, _ := m.ReadUint64(counter)
		return v > after+1000
	}, 10*time.Second, time.Millisecond, "the guest counts on after Resume")
	require.NoError(t, m.WriteUint64(stop, 1))
	require.NoError(t, <-done)
	final, err := m.ReadUint64(counter)
	require.NoError(t, err)
	require.Greater(t, final, after+1000, "the guest went on from the paused count")
}

// Close never hangs behind a guest that spins: VCPU.Close and VM.Close both
// return, and the Run returns ErrClosed.
func TestCloseWhileGuestSpins(t *testing.T) {
	for _, what := range []string{"vcpu", "vm"} {
		t.Run(what, func(t *testing.T) {
			mach, _ := spinner(t, 1<<62)
			var wg sync.WaitGroup
			wg.Add(1)
			var runErr error
			go func() { defer wg.Done(); _, runErr = mach.CPU.Run() }()
			require.Eventually(t, func() bool { return mach.CPU.State() == kvm.StateRunning }, 5*time.Second,
				time.Millisecond)
			time.Sleep(20 * time.Millisecond)
			closed := make(chan error, 1)
			go func() {
				if what == "vcpu" {
					closed <- mach.CPU.Close()
				} else {
					closed <- mach.VM.Close()
				}
			}()
			select {
			case err := <-closed:
				require.NoError(t, err)
			case <-time.After(10 * time.Second):
				t.Fatal("Close hangs behind a spinning guest")
			}
			wg.Wait()
			require.ErrorIs(t, runErr, kvm.ErrClosed)
			require.Equal(t, kvm.StateClosed, mach.CPU.State())
		})
	}
}
