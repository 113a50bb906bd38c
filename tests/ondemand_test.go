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

// On-demand restore with guest code: every page the guest touches arrives
// through a userfault raised by KVM.

const odSize = 256 * mib

// odSnapshot saves a guest of odSize bytes at GPA 0 whose every page starts
// with guest.Pattern(address, seed), and returns the stream and the sum of
// those first quadwords.
func odSnapshot(t *testing.T) ([]byte, uint64) {
	t.Helper()
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: odSize}})
	var sum uint64
	for a := uint64(0); a < odSize; a += page {
		require.NoError(t, m.WriteUint64(guestmem.GuestAddress(a), guest.Pattern(a, seed)))
		sum += guest.Pattern(a, seed)
	}
	var buf bytes.Buffer
	_, err := m.Save(context.Background(), &buf, guestmem.SaveOptions{})
	require.NoError(t, err)
	return buf.Bytes(), sum
}

// The guest checksums all of a 256 MiB guest restored through userfaultfd
// with no background fill, so every page arrives by a KVM-driven fault; its
// sum matches the host's, for each backing.
func TestGuestChecksumsOnDemandRestore(t *testing.T) {
	testenv.VM(t) // skip early without KVM
	stream, want := odSnapshot(t)
	for _, tc := range []struct {
		name string
		opts func(t *testing.T) []guestmem.Option
	}{
		{"anonymous", func(*testing.T) []guestmem.Option { return nil }},
		{"memfd", func(*testing.T) []guestmem.Option { return []guestmem.Option{guestmem.WithMemfd()} }},
		{"hugetlb", func(t *testing.T) []guestmem.Option {
			testenv.NeedHugetlbPages(t, odSize/(2*mib))
			return []guestmem.Option{guestmem.WithHugetlb(2 * mib)}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			noLeaks(t)
			ctx := context.Background()
			m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
				guestmem.OnDemandOptions{Fillers: -1}, tc.opts(t)...)
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, m.Close()) })
			mach := vmWith(t, m)
			start := time.Now()
			require.Equal(t, want, guestSum(t, mach, 0, odSize), "the guest's checksum of restored RAM")
			p := od.Progress()
			t.Logf("guest summed %d MiB in %v: %d faults fetched data (p50 %v, p99 %v), %d zero faults",
				odSize/mib, time.Since(start), p.FaultFetches, p.FaultP50, p.FaultP99, p.ZeroFaults)
			require.Equal(t, p.DataBytes, p.ResidentBytes, "the guest's faults brought every page in")
			require.Zero(t, p.HostFetched, "and the host touched none")
			require.NotZero(t, p.FaultFetches)
			require.NoError(t, od.Wait(ctx))
			require.Equal(t, want, hostSum(t, m, 0, odSize), "the host's checksum")
		})
	}
}

// slowSource delays every read, as a network fetch would, and can fail.
type slowSource struct {
	r     io.ReaderAt
	delay time.Duration
	fail  atomic.Bool
}

var errGone = errors.New("the snapshot store went away")

func (s *slowSource) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	if s.fail.Load() {
		return 0, errGone
	}
	return s.r.ReadAt(p, off)
}

// From a slow source, the guest runs at once: its first instruction reads
// restored memory long before the memory is resident.
func TestGuestRunsWhileMemoryStreams(t *testing.T) {
	noLeaks(t)
	vm := testenv.VM(t)
	stream, _ := odSnapshot(t)
	ctx := context.Background()
	src := &slowSource{r: bytes.NewReader(stream), delay: 2 * time.Millisecond}
	mach, err := guest.New(vm, guest.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, mach.Close()) })
	at, err := mach.LoadAsm(guest.Load())
	require.NoError(t, err)

	start := time.Now()
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{src}, guestmem.OnDemandOptions{Fillers: 1})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	ready := time.Since(start)
	require.NoError(t, m.Register(vm))
	const probe = 200 * mib
	res, err := mach.Call(at, kvm.Regs{RSI: probe}, guest.Handlers{})
	require.NoError(t, err)
	first := time.Since(start)
	v, ok := res.Port64(guest.PortLo, guest.PortHi)
	require.True(t, ok)
	require.Equal(t, guest.Pattern(probe, seed), v)
	p := od.Progress()
	require.Less(t, p.ResidentBytes, p.DataBytes, "the guest read restored memory before it was all in")
	require.NoError(t, od.Wait(ctx))
	t.Logf("slow source (%v a read): ready in %v, first guest read in %v, resident in %v", src.delay, ready, first,
		time.Since(start))
}

// A source that fails mid-restore stops the vCPU touching lost memory with
// a memory fault: no hang, no zeros.
func TestGuestStopsOnLostMemory(t *testing.T) {
	noLeaks(t)
	testenv.VM(t)
	stream, _ := odSnapshot(t)
	ctx := context.Background()
	src := &slowSource{r: bytes.NewReader(stream)}
	failed := make(chan error, 1)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{src},
		guestmem.OnDemandOptions{Fillers: -1, OnFailure: func(err error) { failed <- err }})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	mach := vmWith(t, m)
	require.Equal(t, guest.Pattern(5*mib, seed), guestLoad(t, mach, 5*mib), "before the failure")
	src.fail.Store(true)

	at, err := mach.LoadAsm(guest.Load())
	require.NoError(t, err)
	_, err = mach.Call(at, kvm.Regs{RSI: 100 * mib}, guest.Handlers{})
	require.ErrorIs(t, err, kvm.ErrMemoryFault, "the vCPU stops with a memory fault")
	require.ErrorIs(t, <-failed, errGone)
	require.ErrorIs(t, od.Wait(ctx), guestmem.ErrRestoreFailed)
	require.Equal(t, guest.Pattern(5*mib, seed), guestLoad(t, mach, 5*mib), "what arrived is still there")
}

func guestLoad(t *testing.T, mach *guest.Machine, a uint64) uint64 {
	t.Helper()
	res := run(t, mach, guest.Load(), kvm.Regs{RSI: a}, guest.Handlers{})
	v, ok := res.Port64(guest.PortLo, guest.PortHi)
	require.True(t, ok)
	return v
}

// A guest replays an access pattern after restore: with the working set
// recorded on the first restore prefetched on the second, the faults the
// handlers serve from the source drop by 90% or more.
func TestGuestWorkingSetPrefetch(t *testing.T) {
	noLeaks(t)
	testenv.VM(t)
	stream, _ := odSnapshot(t)
	ctx := context.Background()
	// The pattern: one quadword every 1 MiB + 12 KiB across the guest.
	const stride = mib + 3*page
	pattern := func(m *guestmem.Memory) uint64 {
		mach := vmWith(t, m)
		return guestSumStride(t, mach, 0, odSize, stride)
	}
	m1, od1, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{Fillers: -1})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m1.Close()) })
	sum1 := pattern(m1)
	without := od1.Progress().FaultFetches
	ws := od1.WorkingSet()
	require.NoError(t, m1.Close())

	m2, od2, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{WorkingSet: ws, Fillers: 1})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m2.Close()) })
	require.NoError(t, od2.WaitWorkingSet(ctx))
	require.Equal(t, sum1, pattern(m2))
	with := od2.Progress().FaultFetches
	t.Logf("faults served from the source: %d without the working set, %d with", without, with)
	require.NotZero(t, without)
	require.LessOrEqual(t, with*10, without)
}

func guestSumStride(t *testing.T, mach *guest.Machine, start, end, stride uint64) uint64 {
	t.Helper()
	res := run(t, mach, guest.SumPages(), kvm.Regs{RSI: start, RDI: end, RBX: stride}, guest.Handlers{})
	sum, ok := res.Port64(guest.PortLo, guest.PortHi)
	require.True(t, ok)
	return sum
}
