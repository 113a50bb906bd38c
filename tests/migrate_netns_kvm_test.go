//go:build amd64

package tests

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/kvm"
)

// Live migration of a running guest between two "hosts": the guest sweeps
// its working set, adding one to a counter in each of its pages, while its
// memory crosses a tbf-shaped veth link to a second process in another
// network namespace. That process makes a VM of its own, gives the vCPU the
// source's registers at the pause, and the guest goes on sweeping there,
// then checks its own counters and reports them.

const (
	guestMigSize   = 16 * mib
	guestMigSpan   = 4 * mib // the working set the guest sweeps
	guestMigStride = 64 << 10
	guestMigPort   = 7442
	guestMigMore   = 50 // sweeps the destination runs
	// guestMigSweeps is more than any host finishes: the source's guest is
	// stopped by the test, never by its count.
	guestMigSweeps = 1 << 50
)

// sweepAndCheck is sweep followed by a check: every counter of [RSI, RDI)
// at stride RBX must equal the first. It reports the first on PortLo and
// PortHi then writes PortDone, or reports the first address that differs
// and writes PortFail.
func sweepAndCheck() *guest.Asm {
	a := &guest.Asm{}
	sweepLoop(a)
	a.Load(guest.R8, guest.RSI)
	a.Mov(guest.RDX, guest.RSI)
	a.Label("check")
	a.Load(guest.RAX, guest.RDX)
	a.Cmp(guest.RAX, guest.R8)
	a.Jnz("fail")
	a.Add(guest.RDX, guest.RBX)
	a.Cmp(guest.RDX, guest.RDI)
	a.Jb("check")
	report(a, guest.R8, guest.PortDone)
	a.Label("fail")
	report(a, guest.RDX, guest.PortFail)
	return a
}

// report writes r on PortLo and PortHi (through RAX), then port, and halts.
func report(a *guest.Asm, r guest.Reg, port uint8) {
	a.Mov(guest.RAX, r)
	a.Out(guest.PortLo)
	a.Shr(guest.RAX, 32)
	a.Out(guest.PortHi)
	a.Out(port)
	a.Hlt()
}

// runningGuest is the source: a guest sweeping on its own goroutine.
type runningGuest struct {
	mem  *guestmem.Memory
	mach *guest.Machine
	at   uint64
	stop atomic.Bool
	ran  chan error
}

func startSweepingGuest(t *testing.T, ring int) *runningGuest {
	t.Helper()
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: guestMigSize}}, guestmem.WithMemfd())
	// Data in every page, so the first pass has the whole guest to send.
	for a := uint64(guestMigSpan); a < guestMigSize; a += page {
		require.NoError(t, m.WriteUint64(guestmem.GuestAddress(a), a^0x5eed))
	}
	g := &runningGuest{mem: m, mach: machineWith(t, m, ring), ran: make(chan error, 1)}
	require.NoError(t, m.StartDirtyTracking())
	var err error
	g.at, err = g.mach.LoadAsm(sweepAndCheck())
	require.NoError(t, err)
	require.NoError(t, g.mach.Start(g.at, kvm.Regs{RSI: 0, RDI: guestMigSpan, RBX: guestMigStride,
		RCX: guestMigSweeps}))
	go func() {
		for {
			e, err := g.mach.CPU.Run()
			switch {
			case err != nil:
				g.ran <- err
				return
			case e.Reason == kvm.ExitIntr && g.stop.Load():
				g.ran <- nil
				return
			case e.Reason != kvm.ExitIntr:
				g.ran <- errors.New("unexpected exit " + e.String())
				return
			}
		}
	}()
	t.Cleanup(func() {
		g.stop.Store(true)
		g.mach.CPU.Kick()
		g.mach.VM.Resume()
		require.NoError(t, <-g.ran)
	})
	g.waitSweeping(t)
	return g
}

// waitSweeping waits until the guest's first counter moves.
func (g *runningGuest) waitSweeping(t *testing.T) {
	t.Helper()
	first, err := g.mem.ReadUint64(0)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		v, err := g.mem.ReadUint64(0)
		return err == nil && v > first+10
	}, 30*time.Second, time.Millisecond, "the source guest sweeps")
}

// startGuestReceiver runs TestGuestMigrationReceiverProcess in the
// namespace, its VM made with a dirty ring of ring bytes (0: the bitmap).
func startGuestReceiver(t *testing.T, l *netLink, ring int) *receiver {
	t.Helper()
	return startIn(t, l, "TestGuestMigrationReceiverProcess",
		"GMEM_GUEST_RECEIVER="+net.JoinHostPort(l.peerIP, strconv.Itoa(guestMigPort)),
		"GMEM_GUEST_RECEIVER_RING="+strconv.Itoa(ring))
}

// handOver is what the source tells the receiver after the pause: where the
// program is and the vCPU's registers (RCX set to the sweeps left to run).
type handOver struct {
	At   uint64
	Regs kvm.Regs
}

// migrateGuest migrates g to a new receiver over l and checks the result:
// the destination's memory at the pause is the source's (pre-copy: the
// receiver's checksum before its guest runs); the guest there reports every
// counter at the value the sweeps imply; and the destination's memory after
// it halts is the source's at the pause with those counters.
func migrateGuest(t *testing.T, l *netLink, g *runningGuest, ring int, postCopy bool) guestmem.MigrateStats {
	t.Helper()
	r := startGuestReceiver(t, l, ring)
	// At the pause the vCPU's state goes to the destination, as a VMM sends
	// its device state: with post-copy the guest runs there before the
	// memory is all across.
	var paused kvm.Regs
	var handedOver error
	pause := func(ctx context.Context) error {
		if err := g.mach.VM.Pause(ctx); err != nil {
			return err
		}
		regs, err := g.mach.CPU.Regs()
		if err != nil {
			return err
		}
		paused = regs
		regs.RCX = guestMigMore
		b, err := json.Marshal(handOver{At: g.at, Regs: regs})
		if err == nil {
			_, err = fmt.Fprintf(r.stdin, "%s\n", b)
		}
		handedOver = err
		return nil
	}
	st, err := g.mem.Migrate(context.Background(), dialPort(t, l, guestMigPort), guestmem.MigrateOptions{
		Pause:  pause,
		Resume: func() error { g.mach.VM.Resume(); return nil },
		// The machine may be busy: never fail the test on convergence.
		OnLimit: guestmem.StopAndCopy, MaxDowntime: 300 * time.Millisecond, IOTimeout: 10 * time.Second,
		PostCopy: postCopy,
	})
	require.NoError(t, err)
	require.NoError(t, handedOver)
	t.Logf("migrated in %v, %d rounds, downtime %v, %d bytes sent for %d populated, %d after switchover",
		st.Total, st.Rounds, st.Downtime, st.Bytes, st.Populated, st.PostCopyBytes)
	require.True(t, g.mach.VM.Paused(), "the source guest stays paused after the switchover")
	require.Greater(t, paused.RCX, uint64(0))
	require.Less(t, paused.RCX, uint64(guestMigSweeps), "paused after the first sweep")
	atPause := image(t, g.mem)
	want := uint64(guestMigSweeps) - paused.RCX + guestMigMore
	final := append([]byte(nil), atPause...)
	for a := uint64(0); a < guestMigSpan; a += guestMigStride {
		binary.LittleEndian.PutUint64(final[a:], want)
	}
	if !postCopy {
		require.Equal(t, fmt.Sprintf("%08x", crc32.ChecksumIEEE(atPause)), r.expect(t, "received crc"),
			"the destination's memory is the source's at the pause")
	} else {
		r.expect(t, "post-copy: running")
	}
	require.Equal(t, fmt.Sprintf("ok %d", want), r.expect(t, "counters"), "the guest's own check on the destination")
	require.Equal(t, fmt.Sprintf("%08x", crc32.ChecksumIEEE(final)), r.expect(t, "final crc"),
		"the destination's memory after the guest ran: the pause's, with the counters it went on to")
	require.NoError(t, <-r.done)
	return st
}

func TestGuestMigratesBetweenNamespaces(t *testing.T) {
	if os.Getenv("GMEM_GUEST_RECEIVER") != "" {
		return // the receiving process runs TestGuestMigrationReceiverProcess only
	}
	l := newNetLink(t, "400mbit")
	for _, postCopy := range []bool{false, true} {
		for _, ring := range []int{0, 64 << 10} {
			name := map[bool]string{false: "pre-copy", true: "post-copy"}[postCopy] + "/" +
				map[bool]string{false: "bitmap", true: "ring"}[ring > 0]
			t.Run(name, func(t *testing.T) {
				noLeaks(t)
				g := startSweepingGuest(t, ring)
				migrateGuest(t, l, g, ring, postCopy)
			})
		}
	}

	// The link cut and the receiver killed, each mid-pre-copy: the source
	// guest runs on, and migrates whole afterwards.
	for _, cut := range []string{"link down", "receiver killed"} {
		t.Run("pre-copy "+cut+", then again", func(t *testing.T) {
			noLeaks(t)
			g := startSweepingGuest(t, 0)
			r := startGuestReceiver(t, l, 0)
			var once sync.Once
			_, err := g.mem.Migrate(context.Background(), dialPort(t, l, guestMigPort), guestmem.MigrateOptions{
				Pause:  g.mach.VM.Pause,
				Resume: func() error { g.mach.VM.Resume(); return nil },
				// Rounds go on until the cut: the target cannot be met.
				MaxDowntime: time.Nanosecond, MaxRounds: 1000, IOTimeout: 2 * time.Second,
				Progress: func(rs guestmem.RoundStats) {
					if rs.Round == 1 {
						once.Do(func() {
							if cut == "link down" {
								run1(t, "ip", "link", "set", l.host, "down")
							} else {
								_ = r.cmd.Process.Kill()
							}
						})
					}
				}})
			require.Error(t, err, "the cut fails the migration, not hangs it")
			t.Logf("source: %v", err)
			if cut == "link down" {
				run1(t, "ip", "link", "set", l.host, "up")
				_ = r.cmd.Process.Kill()
			}
			<-r.done
			require.False(t, g.mach.VM.Paused(), "the source guest is not left paused")
			g.waitSweeping(t)
			migrateGuest(t, l, g, 0, false)
		})
	}
}

// TestGuestMigrationReceiverProcess is the receiving side, run by
// TestGuestMigratesBetweenNamespaces in its namespace: it receives the
// memory, reads the hand-over from stdin, and runs the guest to its end.
func TestGuestMigrationReceiverProcess(t *testing.T) {
	addr := os.Getenv("GMEM_GUEST_RECEIVER")
	if addr == "" {
		return // only as the receiving process
	}
	ring, err := strconv.Atoi(os.Getenv("GMEM_GUEST_RECEIVER_RING"))
	require.NoError(t, err)
	m, rs, err := guestmem.ReceiveMigration(context.Background(), acceptConns(t, addr), guestmem.WithMemfd())
	if err != nil {
		fmt.Println("receive error:", err)
		os.Exit(2)
	}
	defer m.Close()
	sc := bufio.NewScanner(os.Stdin)
	require.True(t, sc.Scan(), "the hand-over")
	var h handOver
	require.NoError(t, json.Unmarshal(sc.Bytes(), &h))
	if rs.PostCopy != nil {
		fmt.Println("post-copy: running before the last pages are here")
	} else {
		fmt.Printf("received crc %08x\n", imageCRC(t, m))
	}

	mach := machineWith(t, m, ring)
	at, err := mach.LoadAsm(sweepAndCheck())
	require.NoError(t, err)
	require.Equal(t, h.At, at, "the program sits where it did on the source")
	require.NoError(t, mach.Start(at, h.Regs))
	require.NoError(t, mach.CPU.SetRegs(h.Regs))
	var lo, hi uint32
	result := ""
	for result == "" {
		e, err := mach.CPU.Run()
		require.NoError(t, err)
		switch {
		case e.Reason == kvm.ExitIO && e.IO.Out && e.IO.Port == guest.PortLo:
			lo = e.IO.Value()
		case e.Reason == kvm.ExitIO && e.IO.Out && e.IO.Port == guest.PortHi:
			hi = e.IO.Value()
		case e.Reason == kvm.ExitIO && e.IO.Out && e.IO.Port == guest.PortDone:
			result = fmt.Sprintf("ok %d", uint64(hi)<<32|uint64(lo))
		case e.Reason == kvm.ExitIO && e.IO.Out && e.IO.Port == guest.PortFail:
			result = fmt.Sprintf("FAIL at %#x", uint64(hi)<<32|uint64(lo))
		case e.Reason == kvm.ExitIntr:
		default:
			t.Fatalf("unexpected exit %v", e)
		}
	}
	fmt.Println("counters", result)
	if rs.PostCopy != nil {
		require.NoError(t, rs.PostCopy.Wait(context.Background()))
	}
	fmt.Printf("final crc %08x\n", imageCRC(t, m))
}
