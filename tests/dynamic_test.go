//go:build amd64

package tests

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

const (
	mib  = 1 << 20
	page = 4096
	seed = 0x5eed_0000_0000
)

// noLeaks fails t if it ends with more fds or guest mappings than it began
// with. Register it first: cleanups run last-in first-out.
func noLeaks(t *testing.T) {
	t.Helper()
	fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
	t.Cleanup(func() {
		require.Equal(t, fds, testenv.OpenFDs(t), "open fds")
		require.Equal(t, maps, testenv.GuestMappings(t), "guest mappings")
	})
}

// vmWith creates a VM, a long-mode machine on it, and registers m.
func vmWith(t *testing.T, m *guestmem.Memory) *guest.Machine {
	t.Helper()
	vm := testenv.VM(t)
	mach, err := guest.New(vm, guest.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, mach.Close()) })
	require.NoError(t, m.Register(vm))
	return mach
}

func newMem(t *testing.T, l guestmem.Layout, opts ...guestmem.Option) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(l, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

// run assembles and runs a standard program with the given registers.
func run(t *testing.T, mach *guest.Machine, prog *guest.Asm, regs kvm.Regs, h guest.Handlers) guest.Result {
	t.Helper()
	at, err := mach.LoadAsm(prog)
	require.NoError(t, err)
	res, err := mach.Call(at, regs, h)
	require.NoError(t, err)
	return res
}

func fill(t *testing.T, mach *guest.Machine, start, end, s uint64) {
	t.Helper()
	res := run(t, mach, guest.FillPages(), kvm.Regs{RSI: start, RDI: end, RDX: s, RBX: page}, guest.Handlers{})
	_, done := res.Port(guest.PortDone)
	require.True(t, done)
}

// guestSum has the guest add the first quadword of every page of [start, end).
func guestSum(t *testing.T, mach *guest.Machine, start, end uint64) uint64 {
	t.Helper()
	res := run(t, mach, guest.SumPages(), kvm.Regs{RSI: start, RDI: end, RBX: page}, guest.Handlers{})
	sum, ok := res.Port64(guest.PortLo, guest.PortHi)
	require.True(t, ok, "the guest reported its sum through port I/O")
	return sum
}

// guestVerify has the guest check the FillPages pattern over [start, end).
func guestVerify(t *testing.T, mach *guest.Machine, start, end, s uint64) {
	t.Helper()
	res := run(t, mach, guest.VerifyPages(), kvm.Regs{RSI: start, RDI: end, RDX: s, RBX: page}, guest.Handlers{})
	if _, failed := res.Port(guest.PortFail); failed {
		at, _ := res.Port64(guest.PortLo, guest.PortHi)
		t.Fatalf("guest found a wrong value at %#x", at)
	}
}

func hostSum(t *testing.T, m *guestmem.Memory, start, end uint64) uint64 {
	t.Helper()
	var sum uint64
	for a := start; a < end; a += page {
		v, err := m.ReadUint64(guestmem.GuestAddress(a))
		require.NoError(t, err)
		sum += v
	}
	return sum
}

// Hotplug: the guest polls a page of a region that is not there yet, taking
// MMIO exits, while the host adds the region from another goroutine; the
// guest then reads what the host wrote. Removing the region sends the guest
// back to MMIO exits.
func TestHotplugWhileGuestRuns(t *testing.T) {
	noLeaks(t)
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: 2 * mib}}, guestmem.WithMemfd(),
		guestmem.WithHotplug(64*mib))
	mach := vmWith(t, m)
	const hot, target, want = 1 << 30, 1<<30 + 0x2008, 0x600d_cafe

	var mmio atomic.Int64
	type result struct {
		res guest.Result
		err error
	}
	done := make(chan result, 1)
	at, err := mach.LoadAsm(guest.Poll())
	require.NoError(t, err)
	go func() {
		res, err := mach.Call(at, kvm.Regs{RSI: target, RDX: want}, guest.Handlers{MMIO: func(e *kvm.MMIOExit) error {
			if e.Addr == target && !e.Write {
				mmio.Add(1)
			}
			clear(e.Data)
			return nil
		}})
		done <- result{res, err}
	}()
	for mmio.Load() < 5 {
		time.Sleep(time.Millisecond)
	}
	r, err := m.AddRegion(guestmem.RegionSpec{GPA: hot, Size: 64 * mib})
	require.NoError(t, err)
	require.NoError(t, m.WriteUint64(target, want))
	var out result
	select {
	case out = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the guest never saw the hot-added region")
	}
	require.NoError(t, out.err)
	_, ok := out.res.Port(guest.PortDone)
	require.True(t, ok)
	require.GreaterOrEqual(t, mmio.Load(), int64(5), "the guest took MMIO exits before the add")
	hr, err := m.Region(hot)
	require.NoError(t, err)
	require.GreaterOrEqual(t, hr.Slot, 0, "registered")
	slot := uint32(hr.Slot)
	s, err := mach.VM.Slot(slot)
	require.NoError(t, err)
	require.Equal(t, r.HostAddr, s.HostAddr)

	// The guest writes into the region; the host sees it through the memfd.
	fill(t, mach, hot, hot+64*mib, seed)
	var b [8]byte
	_, err = unix.Pread(m.FD(), b[:], r.FDOffset+page*100)
	require.NoError(t, err)
	v, _ := m.ReadUint64(hot + page*100)
	require.Equal(t, guest.Pattern(hot+page*100, seed), v)

	// Removal: the slot goes first, so the guest is back to MMIO exits.
	require.NoError(t, m.RemoveRegion(hot))
	_, err = mach.VM.Slot(slot)
	require.ErrorIs(t, err, kvm.ErrNoSlot)
	res := run(t, mach, guest.Load(), kvm.Regs{RSI: target}, guest.Handlers{})
	require.Len(t, res.MMIO, 1)
	require.Equal(t, uint64(target), res.MMIO[0].Addr)
	require.False(t, res.MMIO[0].Write)
	res = run(t, mach, guest.Store(), kvm.Regs{RSI: target, RDX: 7}, guest.Handlers{})
	require.Len(t, res.MMIO, 1)
	require.True(t, res.MMIO[0].Write)
	require.Equal(t, uint64(7), res.MMIO[0].Value())
}

// Balloon: the guest writes every page of 128 MiB, the host discards 64 MiB
// of it; host memory falls by at least that much, the guest reads zeros
// there and its data elsewhere.
func TestBalloonDiscard(t *testing.T) {
	for _, backing := range []guestmem.Backing{guestmem.Memfd, guestmem.Anonymous} {
		t.Run(backing.String(), func(t *testing.T) {
			noLeaks(t)
			const size = 128 * mib
			m := newMem(t, guestmem.Layout{{GPA: 0, Size: size}}, withBacking(backing))
			mach := vmWith(t, m)
			fill(t, mach, 0, size, seed)

			rss := func() int64 {
				st, err := m.Stats()
				require.NoError(t, err)
				return int64(st[0].Resident)
			}
			blocks := func() int64 {
				if backing != guestmem.Memfd {
					return 0
				}
				var st unix.Stat_t
				require.NoError(t, unix.Fstat(m.FD(), &st))
				return st.Blocks * 512
			}
			rss0, blocks0 := rss(), blocks()
			require.GreaterOrEqual(t, rss0, int64(size), "the guest touched every page")

			const lo, hi = 32 * mib, 96 * mib
			require.NoError(t, m.Discard(lo, hi-lo))
			require.GreaterOrEqual(t, rss0-rss(), int64(hi-lo), "Rss drops by the discarded bytes")
			if backing == guestmem.Memfd {
				require.GreaterOrEqual(t, blocks0-blocks(), int64(hi-lo), "the memfd frees its blocks")
			}
			require.Zero(t, guestSum(t, mach, lo, hi), "the guest reads zeros where memory was discarded")
			guestVerify(t, mach, 0, lo, seed)
			guestVerify(t, mach, hi, size, seed)
		})
	}
}

// Dirty tracking: exactly the union of the pages the guest wrote and the
// pages the host wrote is reported; then nothing, after a collection with no
// writes in between.
func TestDirtyUnionOfGuestAndHost(t *testing.T) {
	noLeaks(t)
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: 32 * mib}, {GPA: 64 * mib, Size: 32 * mib}},
		guestmem.WithMemfd())
	require.NoError(t, m.StartDirtyTracking()) // before Register: slots are created logging
	mach := vmWith(t, m)
	// Warm up: the first run may touch nothing of guest RAM, but collect anyway.
	_, err := m.CollectDirty()
	require.NoError(t, err)

	want := map[uint64]bool{}
	for _, p := range []uint64{3, 4, 5, 1000, 8191} { // guest: single pages and a run
		fill(t, mach, p*page, p*page+page, seed)
		want[p*page] = true
	}
	fill(t, mach, 64*mib+100*page, 64*mib+164*page, seed) // guest: 64 pages in region 2
	for p := uint64(100); p < 164; p++ {
		want[64*mib+p*page] = true
	}
	for _, a := range []uint64{5 * page, 7 * page, 64*mib + 8000*page} { // host: one overlapping the guest's
		require.NoError(t, m.WriteUint64(guestmem.GuestAddress(a+16), 1))
		want[a] = true
	}
	d, err := m.CollectDirty()
	require.NoError(t, err)
	got := map[uint64]bool{}
	for s := range d.Ranges() {
		for a := uint64(s.GPA); a < uint64(s.GPA)+s.Size; a += page {
			got[a] = true
		}
	}
	require.Equal(t, want, got)
	require.Equal(t, uint64(len(want)), d.Pages())

	d, err = m.CollectDirty()
	require.NoError(t, err)
	require.Zero(t, d.Pages(), "nothing is dirty after a reset with no writes")

	// Tracking off: slots stop logging; on again: logging resumes.
	require.NoError(t, m.StopDirtyTracking())
	require.NoError(t, m.StartDirtyTracking())
	fill(t, mach, 9*page, 10*page, seed)
	d, err = m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.Span{{GPA: 9 * page, Size: page}}, collect(d))
}

func collect(d *guestmem.DirtySet) []guestmem.Span {
	var out []guestmem.Span
	for s := range d.Ranges() {
		out = append(out, s)
	}
	return out
}

// Snapshot: a guest writes a pattern, memory is saved and restored into a new
// VM eagerly and lazily, and a guest there checksums it; an incremental save
// after more writes, applied on the base, restores the later state.
func TestSnapshotRestoreIntoNewVM(t *testing.T) {
	noLeaks(t)
	layout := guestmem.Layout{{GPA: 0, Size: 32 * mib}, {GPA: 64 * mib, Size: 16 * mib}}
	m := newMem(t, layout, guestmem.WithMemfd())
	require.NoError(t, m.StartDirtyTracking())
	mach := vmWith(t, m)
	// The guest writes every other 1 MiB of region 1 and all of region 2.
	for a := uint64(0); a < 32*mib; a += 2 * mib {
		fill(t, mach, a, a+mib, seed)
	}
	fill(t, mach, 64*mib, 80*mib, seed)
	sums := func(m *guestmem.Memory) [2]uint64 {
		return [2]uint64{hostSum(t, m, 0, 32*mib), hostSum(t, m, 64*mib, 80*mib)}
	}
	want := sums(m)
	require.NotZero(t, want[0])

	dir := t.TempDir()
	base := saveTo(t, m, filepath.Join(dir, "base"), false)
	require.Equal(t, uint64(16*mib+16*mib), base.DataBytes, "only what the guest wrote is saved")

	// More guest writes, then an increment.
	fill(t, mach, mib, 2*mib, seed^0xff) // a range that was zero
	fill(t, mach, 64*mib, 66*mib, seed^0xee)
	want2 := sums(m)
	inc := saveTo(t, m, filepath.Join(dir, "inc"), true)
	require.Equal(t, uint64(3*mib), inc.DataBytes, "the increment holds only the dirtied pages")

	check := func(name string, r *guestmem.Memory, want [2]uint64) {
		t.Helper()
		defer func() { require.NoError(t, r.Close()) }()
		vm := testenv.VM(t)
		mach, err := guest.New(vm, guest.Config{})
		require.NoError(t, err)
		defer func() { require.NoError(t, mach.Close()) }()
		require.NoError(t, r.Register(vm))
		require.Equal(t, want[0], guestSum(t, mach, 0, 32*mib), "%s: region 1 as the guest sums it", name)
		require.Equal(t, want[1], guestSum(t, mach, 64*mib, 80*mib), "%s: region 2", name)
	}
	open := func(names ...string) []*os.File {
		var fs []*os.File
		for _, n := range names {
			f, err := os.Open(filepath.Join(dir, n))
			require.NoError(t, err)
			t.Cleanup(func() { f.Close() })
			fs = append(fs, f)
		}
		return fs
	}
	readers := func(names ...string) []io.Reader {
		var rs []io.Reader
		for _, f := range open(names...) {
			rs = append(rs, f)
		}
		return rs
	}
	r, err := guestmem.Restore(context.Background(), readers("base"))
	require.NoError(t, err)
	check("eager", r, want)
	r, err = guestmem.RestoreLazy(context.Background(), open("base"))
	require.NoError(t, err)
	check("lazy", r, want)
	r, err = guestmem.Restore(context.Background(), readers("base", "inc"), guestmem.WithAnonymous())
	require.NoError(t, err)
	check("eager base+increment", r, want2)
	r, err = guestmem.RestoreLazy(context.Background(), open("base", "inc"))
	require.NoError(t, err)
	check("lazy base+increment", r, want2)
}

func saveTo(t *testing.T, m *guestmem.Memory, path string, inc bool) guestmem.SaveStats {
	t.Helper()
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	st, err := m.Save(context.Background(), f, guestmem.SaveOptions{Incremental: inc})
	require.NoError(t, err)
	info, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, info.Size(), st.Bytes)
	return st
}

// withBacking is the backing option for b, for tests that loop over
// backings (hugetlb and file need arguments, so are not among them).
func withBacking(b guestmem.Backing) guestmem.Option {
	switch b {
	case guestmem.Memfd:
		return guestmem.WithMemfd()
	case guestmem.Anonymous:
		return guestmem.WithAnonymous()
	}
	panic("withBacking: " + b.String())
}
