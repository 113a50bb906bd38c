//go:build amd64

package tests

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// sweep adds one to the quadword at every stride (RBX) bytes of [RSI, RDI),
// RCX times over, then halts: a guest that keeps dirtying a working set and
// whose counters say how far it got.
func sweep() *guest.Asm {
	a := &guest.Asm{}
	sweepLoop(a)
	a.Out(guest.PortDone)
	a.Hlt()
	return a
}

// sweepLoop is sweep's loop, without the end.
func sweepLoop(a *guest.Asm) {
	a.Label("outer")
	a.Mov(guest.RDX, guest.RSI)
	a.Label("inner")
	a.Load(guest.RAX, guest.RDX)
	a.AddImm(guest.RAX, 1)
	a.Store(guest.RDX, guest.RAX)
	a.Add(guest.RDX, guest.RBX)
	a.Cmp(guest.RDX, guest.RDI)
	a.Jb("inner")
	a.Dec(guest.RCX)
	a.Jnz("outer")
}

// machineWith makes a VM (with a dirty ring of ring bytes, if not 0,
// enabled before its vCPU) and a long-mode machine on it, and registers m.
func machineWith(t *testing.T, m *guestmem.Memory, ring int) *guest.Machine {
	t.Helper()
	vm := testenv.VM(t)
	if ring > 0 {
		require.NoError(t, vm.EnableDirtyRing(ring))
	}
	mach, err := guest.New(vm, guest.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, mach.Close()) })
	require.NoError(t, m.Register(vm))
	return mach
}

// A guest sweeping its working set migrates while it runs, with KVM's dirty
// bitmap and with the dirty ring: at switchover the destination's memory is
// the source's at the pause, byte for byte, and the guest, given the
// source's registers, finishes its sweeps there with every counter right.
// The source's guest would sweep for years (so no host's speed ends it
// before the pause); the destination's is told to stop after 50 more.
func TestGuestMigratesAndCountsOn(t *testing.T) {
	for _, ring := range []int{0, 64 << 10} {
		name := "bitmap"
		if ring > 0 {
			name = "ring"
		}
		t.Run(name, func(t *testing.T) {
			noLeaks(t)
			const size, span, stride, sweeps, more = 16 * mib, 4 * mib, 64 << 10, 1 << 50, 50
			src := newMem(t, guestmem.Layout{{GPA: 0, Size: size}}, guestmem.WithMemfd())
			mach := machineWith(t, src, ring)
			require.NoError(t, src.StartDirtyTracking())
			at, err := mach.LoadAsm(sweep())
			require.NoError(t, err)
			require.NoError(t, mach.Start(at, kvm.Regs{RSI: 0, RDI: span, RBX: stride, RCX: sweeps}))
			ran := make(chan error, 1)
			var stopSource atomic.Bool
			go func() {
				for {
					e, err := mach.CPU.Run()
					if err != nil || e.Reason == kvm.ExitHLT {
						ran <- err
						return
					}
					if e.Reason == kvm.ExitIntr && stopSource.Load() {
						ran <- nil
						return
					}
					if e.Reason != kvm.ExitIntr {
						ran <- errors.New("unexpected exit " + e.String())
						return
					}
				}
			}()
			for v, _ := src.ReadUint64(0); v < 50; v, _ = src.ReadUint64(0) {
				time.Sleep(time.Millisecond)
			}

			send, recv := pipePairs(t)
			got := make(chan *guestmem.Memory, 1)
			go func() {
				m, _, err := guestmem.ReceiveMigration(context.Background(), recv, guestmem.WithMemfd())
				if err != nil {
					t.Error(err)
				}
				got <- m
			}()
			var rounds int
			st, err := src.Migrate(context.Background(), send, guestmem.MigrateOptions{
				Pause:    mach.VM.Pause,
				Resume:   func() error { mach.VM.Resume(); return nil },
				OnLimit:  guestmem.StopAndCopy,
				Progress: func(guestmem.RoundStats) { rounds++ },
			})
			require.NoError(t, err)
			dst := <-got
			require.NotNil(t, dst)
			t.Cleanup(func() { dst.Close() })
			t.Logf("%s: %d rounds, downtime %v, %d bytes", name, st.Rounds, st.Downtime, st.Bytes)
			require.Eventually(t, func() bool { return mach.CPU.State() == kvm.StatePaused }, 5*time.Second,
				time.Millisecond)
			regs, err := mach.CPU.Regs()
			require.NoError(t, err)
			require.Greater(t, regs.RCX, uint64(0), "the guest was paused mid-sweep")
			require.Less(t, regs.RCX, uint64(sweeps), "after its first sweep")
			require.True(t, bytes.Equal(image(t, src), image(t, dst)), "destination = source at the pause")

			// The guest continues on the destination.
			mach2 := machineWith(t, dst, ring)
			at2, err := mach2.LoadAsm(sweep())
			require.NoError(t, err)
			require.Equal(t, at, at2, "the program sits where it did on the source")
			// Sweeps done at the pause (the one under way included), and then
			// the current one finished and more-1 after it.
			want := uint64(sweeps) - regs.RCX + more
			regs.RCX = more
			require.NoError(t, mach2.Start(at2, regs))
			require.NoError(t, mach2.CPU.SetRegs(regs))
			runToHalt(t, mach2.CPU)
			for a := uint64(0); a < span; a += stride {
				v, err := dst.ReadUint64(guestmem.GuestAddress(a))
				require.NoError(t, err)
				require.Equal(t, want, v, "counter at %#x: every sweep counted once, across the move", a)
			}
			// End the source's vCPU goroutine: a kick with no Run under way
			// stops the next one at once.
			stopSource.Store(true)
			mach.CPU.Kick()
			mach.VM.Resume()
			require.NoError(t, <-ran)
		})
	}
}

// image returns every byte of m's guest RAM.
func image(t *testing.T, m *guestmem.Memory) []byte {
	t.Helper()
	var out []byte
	for _, r := range m.Regions() {
		b := make([]byte, r.Size)
		_, err := m.ReadAt(b, int64(r.GPA))
		require.NoError(t, err)
		out = append(out, b...)
	}
	return out
}

// pipePairs is one TCP connection over loopback, both ends.
func pipePairs(t *testing.T) (send, recv []io.ReadWriter) {
	t.Helper()
	l, err := netListen()
	require.NoError(t, err)
	defer l.Close()
	c, err := netDial(l.Addr().String())
	require.NoError(t, err)
	s, err := l.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { c.Close(); s.Close() })
	return []io.ReadWriter{c}, []io.ReadWriter{s}
}
