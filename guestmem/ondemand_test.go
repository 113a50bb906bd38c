package guestmem_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// The host side of on-demand restore. Faults that stand in for a vCPU's are
// made by the kernel: process_vm_readv and process_vm_writev on this
// process reach guest memory with get_user_pages, as KVM does, so a missing
// page is a userfault served by the handlers while the thread waits in a
// system call. (tests/ has the guest-code versions.)

// kernelRead reads guest memory [a, a+n) the way KVM does.
func kernelRead(t testing.TB, m *guestmem.Memory, a guestmem.GuestAddress, n int) ([]byte, error) {
	t.Helper()
	h := hostAddr(t, m, a)
	b := make([]byte, n)
	k, err := unix.ProcessVMReadv(os.Getpid(), []unix.Iovec{{Base: &b[0], Len: uint64(n)}},
		[]unix.RemoteIovec{{Base: h, Len: n}}, 0)
	if err == nil && k != n {
		err = fmt.Errorf("short read: %d of %d", k, n)
	}
	return b, err
}

// kernelWrite writes p at a the way KVM does.
func kernelWrite(t testing.TB, m *guestmem.Memory, a guestmem.GuestAddress, p []byte) error {
	t.Helper()
	h := hostAddr(t, m, a)
	k, err := unix.ProcessVMWritev(os.Getpid(), []unix.Iovec{{Base: &p[0], Len: uint64(len(p))}},
		[]unix.RemoteIovec{{Base: h, Len: len(p)}}, 0)
	if err == nil && k != len(p) {
		err = fmt.Errorf("short write: %d of %d", k, len(p))
	}
	return err
}

// kernelImage reads every region of m through the kernel.
func kernelImage(t testing.TB, m *guestmem.Memory) []byte {
	t.Helper()
	var out []byte
	for _, r := range m.Regions() {
		b, err := kernelRead(t, m, r.GPA, int(r.Size))
		require.NoError(t, err)
		out = append(out, b...)
	}
	return out
}

// odSnapshot is a chain in one stream — a full snapshot, then an increment
// with new data and a discarded range — and the image of guest RAM it holds.
func odSnapshot(t testing.TB, compress bool, opts ...guestmem.Option) ([]byte, []byte) {
	t.Helper()
	m := newMemory(t, snapLayout, opts...)
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	scribble(t, m, 0x11)
	run := bytes.Repeat([]byte("on-demand"), 3*mib/9) // data across several fill units
	_, err := m.WriteAt(run, 1*mib+4096)
	require.NoError(t, err)
	var buf bytes.Buffer
	_, err = m.Save(context.Background(), &buf, guestmem.SaveOptions{Compress: compress})
	require.NoError(t, err)
	scribble(t, m, 0x22)
	require.NoError(t, m.Discard(2*mib, 2*mib)) // a zero record over saved data
	_, err = m.Save(context.Background(), &buf, guestmem.SaveOptions{Incremental: true, Compress: compress})
	require.NoError(t, err)
	return buf.Bytes(), image(t, m)
}

// uffdFDs counts this process's userfaultfds.
func uffdFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.Contains(l, "userfaultfd") {
			n++
		}
	}
	return n
}

func TestRestoreOnDemandServesKernelFaults(t *testing.T) {
	ctx := context.Background()
	backings := map[string][]guestmem.Option{
		"anonymous": {guestmem.WithAnonymous()},
		"memfd":     {guestmem.WithMemfd()},
	}
	for name, opts := range backings {
		for _, compress := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/compress=%v", name, compress), func(t *testing.T) {
				stream, want := odSnapshot(t, compress)
				before := uffdFDs(t)
				// No background fill: every page arrives through a fault.
				m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
					guestmem.OnDemandOptions{Fillers: -1}, opts...)
				require.NoError(t, err)
				defer m.Close()
				require.Equal(t, before+1, uffdFDs(t), "one userfaultfd while restoring")
				require.Zero(t, od.Progress().ResidentBytes, "nothing is read before it is touched")

				got := kernelImage(t, m)
				require.True(t, bytes.Equal(want, got), "what the kernel reads is the snapshot's")
				p := od.Progress()
				require.Equal(t, p.DataBytes, p.ResidentBytes, "every page with data was touched, so filled")
				require.NotZero(t, p.FaultFetches)
				require.LessOrEqual(t, p.ResidentBytes, p.FaultFetches*256<<10,
					"each fault fetched at most one 256 KiB fill unit")
				require.NotZero(t, p.ZeroFaults, "holes were served as zeros")
				require.Zero(t, p.Prefetched)

				require.NoError(t, od.Wait(ctx))
				require.True(t, od.Progress().Done)
				require.Equal(t, before, uffdFDs(t), "fully resident: the userfaultfd is released")
				require.True(t, bytes.Equal(want, image(t, m)))
				require.Equal(t, m.Backing().String(), name)
			})
		}
	}
}

func TestRestoreOnDemandHugetlb(t *testing.T) {
	testenv.NeedHugetlbPages(t, 24)
	ctx := context.Background()
	huge := guestmem.WithHugetlb(2 * mib)
	layout := guestmem.Layout{{GPA: 0, Size: 8 * mib}, {GPA: 16 * mib, Size: 4 * mib}}
	m := newMemory(t, layout, huge)
	scribble(t, m, 0x33)
	var buf bytes.Buffer
	_, err := m.Save(ctx, &buf, guestmem.SaveOptions{})
	require.NoError(t, err)
	want := image(t, m)
	require.NoError(t, m.Close())

	r, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(buf.Bytes())},
		guestmem.OnDemandOptions{Fillers: -1}, huge)
	require.NoError(t, err)
	defer r.Close()
	require.True(t, bytes.Equal(want, kernelImage(t, r)))
	p := od.Progress()
	require.Equal(t, p.FaultFetches*2*mib, p.ResidentBytes, "a hugetlb fault fills its huge page")
	require.NoError(t, od.Wait(ctx))
}

func TestRestoreOnDemandBackgroundFill(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, false)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)}, guestmem.OnDemandOptions{})
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, od.Wait(ctx), "the fillers make it resident untouched")
	p := od.Progress()
	require.True(t, p.Done)
	require.Equal(t, p.DataBytes, p.ResidentBytes)
	require.NotZero(t, p.Prefetched)
	require.True(t, bytes.Equal(want, kernelImage(t, m)))
	// The memory is like any other now: grows, shrinks, saves.
	require.NoError(t, m.Discard(0, 4096))
}

// Host accesses through guestmem's own methods fill what they touch before
// touching it, and writes stick.
func TestRestoreOnDemandHostAccess(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, false)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{Fillers: -1})
	require.NoError(t, err)
	defer m.Close()

	v, err := m.ReadUint64(8)
	require.NoError(t, err)
	require.Equal(t, leUint64(want[8:]), v)
	require.NoError(t, m.WriteUint64(1*mib+4096, 0xfeedface))
	b := make([]byte, 3*4096)
	_, err = m.ReadAt(b, int64(16*mib))
	require.NoError(t, err)
	require.Equal(t, want[8*mib:8*mib+len(b)], b, "region 2 starts at image offset 8 MiB")
	require.NotZero(t, od.Progress().HostFetched)
	require.Zero(t, od.Progress().FaultFetches, "no host access waited on a fault for data")

	got, err := kernelRead(t, m, 1*mib+4096, 8)
	require.NoError(t, err)
	require.Equal(t, uint64(0xfeedface), leUint64(got), "the kernel sees the host's write")
	require.NoError(t, od.Fill(ctx))
	require.NoError(t, od.Wait(ctx))
	v, err = m.ReadUint64(1*mib + 4096)
	require.NoError(t, err)
	require.Equal(t, uint64(0xfeedface), v, "the fill did not overwrite it")
}

func leUint64(b []byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

// countingSource counts reads and bytes, and can fail, corrupt or slow them.
type countingSource struct {
	r      io.ReaderAt
	reads  atomic.Int64
	bytes  atomic.Int64
	delay  time.Duration
	failAt atomic.Int64 // reads touching bytes at or past this offset fail (0: never)
	flipAt atomic.Int64 // a byte here reads flipped (0: none)
}

var errSource = errors.New("the source broke")

func (s *countingSource) ReadAt(p []byte, off int64) (int, error) {
	s.reads.Add(1)
	if s.delay > 0 {
		time.Sleep(s.delay)
	}
	if f := s.failAt.Load(); f > 0 && off+int64(len(p)) > f {
		return 0, errSource
	}
	n, err := s.r.ReadAt(p, off)
	s.bytes.Add(int64(n))
	if f := s.flipAt.Load(); f > 0 && f >= off && f < off+int64(n) {
		p[f-off] ^= 0xff
	}
	return n, err
}

// The call reads only the index, and a fault reads only its fill unit: a
// slow source does not delay the first access by more than one record.
func TestRestoreOnDemandReadsLittleUpFront(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, false)
	src := &countingSource{r: bytes.NewReader(stream), delay: time.Millisecond}
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{src}, guestmem.OnDemandOptions{Fillers: -1})
	require.NoError(t, err)
	defer m.Close()
	info, err := guestmem.Verify(ctx, bytes.NewReader(stream))
	require.NoError(t, err)
	upFront := src.bytes.Load()
	require.Less(t, upFront, int64(len(stream))/20, "the call read %d of %d bytes", upFront, len(stream))
	t.Logf("up front: %d reads, %d bytes of %d (%d records)", src.reads.Load(), upFront, len(stream), info.Records)

	before := src.bytes.Load()
	got, err := kernelRead(t, m, 1*mib+8192, 8)
	require.NoError(t, err)
	require.Equal(t, want[1*mib+8192:1*mib+8192+8], got)
	read := src.bytes.Load() - before
	require.LessOrEqual(t, read, int64(2*256<<10), "one fault read %d bytes: its unit's records, base and increment", read)
	require.Equal(t, uint64(1), od.Progress().FaultFetches, "one fault fetched (counted before the reader is woken)")
}

func TestRestoreOnDemandFailingSource(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, false)
	for _, how := range []string{"read error", "checksum"} {
		t.Run(how, func(t *testing.T) {
			src := &countingSource{r: bytes.NewReader(stream)}
			failed := make(chan error, 1)
			m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{src},
				guestmem.OnDemandOptions{Fillers: -1, OnFailure: func(err error) { failed <- err }})
			require.NoError(t, err)
			defer m.Close()
			// Serve a few pages first, then break the source.
			first, err := kernelRead(t, m, 0, 4096)
			require.NoError(t, err)
			require.Equal(t, want[:4096], first)
			switch how {
			case "read error":
				src.failAt.Store(1)
			case "checksum":
				src.flipAt.Store(int64(bytes.Index(stream, []byte("on-demand"))) + 10*4096) // inside the run's payload
			}

			// Every page now reads its data or fails: never zeros for data.
			for off := 0; off < len(want); off += 4096 {
				gpa := imageGPA(off)
				b, err := kernelRead(t, m, gpa, 4096)
				if err != nil {
					require.ErrorIs(t, err, unix.EFAULT, "a lost page faults the kernel's access")
					continue
				}
				require.Equal(t, want[off:off+4096], b, "page at %v", gpa)
			}
			werr := od.Wait(ctx)
			require.ErrorIs(t, werr, guestmem.ErrRestoreFailed)
			if how == "read error" {
				require.ErrorIs(t, werr, errSource)
			} else {
				require.ErrorIs(t, werr, guestmem.ErrSnapshotChecksum)
			}
			require.ErrorIs(t, <-failed, guestmem.ErrRestoreFailed, "OnFailure is told")
			require.False(t, od.Progress().Done, "a failed restore is never complete")
			// Host accesses to lost data return the error.
			lost := 0
			for off := 0; off < len(want); off += 4096 {
				b := make([]byte, 4096)
				if _, err := m.ReadAt(b, int64(imageGPA(off))); err != nil {
					require.ErrorIs(t, err, guestmem.ErrRestoreFailed)
					lost++
					continue
				}
				require.Equal(t, want[off:off+4096], b)
			}
			require.NotZero(t, lost)
			_, err = m.Save(ctx, io.Discard, guestmem.SaveOptions{})
			require.ErrorIs(t, err, guestmem.ErrRestoreFailed, "no snapshot of a half-restored guest")
		})
	}
}

// imageGPA is the guest address of byte off of snapLayout's image.
func imageGPA(off int) guestmem.GuestAddress {
	for _, r := range snapLayout {
		if uint64(off) < r.Size {
			return r.GPA + guestmem.GuestAddress(off)
		}
		off -= int(r.Size)
	}
	panic("past the image")
}

func TestRestoreOnDemandDiscard(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, false)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{Fillers: -1})
	require.NoError(t, err)
	defer m.Close()
	// Fill one unit, then discard ranges over filled and unfilled data.
	_, err = kernelRead(t, m, 1*mib, 4096)
	require.NoError(t, err)
	discarded := []guestmem.Span{{GPA: 1 * mib, Size: 8192}, {GPA: 1*mib + 512<<10, Size: 64 << 10},
		{GPA: 16 * mib, Size: 4096}}
	for _, s := range discarded {
		require.NoError(t, m.Discard(s.GPA, s.Size))
		copy(want[s.GPA-gpaBase(s.GPA):], make([]byte, s.Size))
	}
	require.True(t, bytes.Equal(want, kernelImage(t, m)), "discarded pages read zeros, the rest the snapshot")
	require.NoError(t, od.Fill(ctx))
	require.NoError(t, od.Wait(ctx))
	require.True(t, bytes.Equal(want, image(t, m)), "and still do once resident")
}

// gpaBase is what to subtract from a to get its offset in the image.
func gpaBase(a guestmem.GuestAddress) guestmem.GuestAddress {
	var skipped guestmem.GuestAddress
	prevEnd := guestmem.GuestAddress(0)
	for _, r := range snapLayout {
		skipped += r.GPA - prevEnd
		if a < r.End() {
			return skipped
		}
		prevEnd = r.End()
	}
	panic("past the layout")
}

// A Save taken with pages still missing is complete.
func TestRestoreOnDemandSaveIsComplete(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, true)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{Fillers: -1}, guestmem.WithMemfd())
	require.NoError(t, err)
	defer m.Close()
	_, err = kernelRead(t, m, 0, 4096) // one unit in, the rest missing
	require.NoError(t, err)
	var again bytes.Buffer
	_, err = m.Save(ctx, &again, guestmem.SaveOptions{})
	require.NoError(t, err)
	require.True(t, od.Progress().Done, "Save filled the memory first")
	r, err := guestmem.Restore(ctx, []io.Reader{&again})
	require.NoError(t, err)
	defer r.Close()
	require.True(t, bytes.Equal(want, image(t, r)), "the snapshot of a lazily restored guest restores identically")
}

func TestRestoreOnDemandRefusesHotplugUntilResident(t *testing.T) {
	ctx := context.Background()
	stream, _ := odSnapshot(t, false)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{Fillers: -1})
	require.NoError(t, err)
	defer m.Close()
	spec := guestmem.RegionSpec{GPA: 64 * mib, Size: 2 * mib}
	_, err = m.AddRegion(spec)
	require.ErrorIs(t, err, guestmem.ErrRestoring)
	require.ErrorIs(t, m.RemoveRegion(0), guestmem.ErrRestoring)
	require.NoError(t, od.Fill(ctx))
	require.NoError(t, od.Wait(ctx))
	_, err = m.AddRegion(spec)
	require.NoError(t, err, "hotplug works once resident")
}

func TestRestoreOnDemandBadInput(t *testing.T) {
	ctx := context.Background()
	stream, _ := odSnapshot(t, false)
	_, _, err := guestmem.RestoreOnDemand(ctx, nil, guestmem.OnDemandOptions{})
	require.ErrorIs(t, err, guestmem.ErrBadOption)
	f := writeFile(t, make([]byte, guestmem.FileSize(snapLayout)))
	_, _, err = guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)}, guestmem.OnDemandOptions{},
		guestmem.WithFile(f))
	require.ErrorIs(t, err, guestmem.ErrBadOption)
	_, _, err = guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream[:len(stream)-100])},
		guestmem.OnDemandOptions{})
	var se *guestmem.SnapshotError
	require.ErrorAs(t, err, &se)
	require.ErrorIs(t, err, guestmem.ErrSnapshotTruncated)
	ws := &guestmem.WorkingSet{Snapshot: [16]byte{1}}
	_, _, err = guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{WorkingSet: ws})
	require.ErrorIs(t, err, guestmem.ErrBadOption, "a working set of another snapshot")
}

// goroutinesSettle waits for the goroutine count to fall to n.
func goroutinesSettle(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	require.LessOrEqual(t, runtime.NumGoroutine(), n, "goroutines left behind")
}

// Cancelling mid-fill, or closing, leaves no descriptor, goroutine or
// mapping behind, and never a waiting fault.
func TestRestoreOnDemandCancelLeavesNothing(t *testing.T) {
	stream, _ := odSnapshot(t, false)
	for _, how := range []string{"cancel", "close"} {
		t.Run(how, func(t *testing.T) {
			fds, goroutines := uffdFDs(t), runtime.NumGoroutine()
			src := &countingSource{r: bytes.NewReader(stream), delay: 2 * time.Millisecond}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{src}, guestmem.OnDemandOptions{Fillers: 2},
				guestmem.WithMemfd(), guestmem.WithName("od-cancel"))
			require.NoError(t, err)
			host := m.Regions()[0].HostAddr
			// A kernel access waiting on the slow source when the restore stops.
			touched := make(chan error, 1)
			go func() {
				_, err := kernelRead(t, m, 6*mib, 4096)
				touched <- err
			}()
			time.Sleep(5 * time.Millisecond)
			if how == "cancel" {
				cancel()
				err := od.Wait(context.Background())
				require.ErrorIs(t, err, guestmem.ErrRestoreFailed)
				require.ErrorIs(t, err, context.Canceled)
				_, rerr := m.ReadAt(make([]byte, 8), int64(7*mib))
				require.Error(t, rerr, "unfilled data is lost, not zeros")
				<-touched // it ends, with data or EFAULT
			}
			require.NoError(t, m.Close())
			if how == "close" {
				<-touched
			}
			require.Equal(t, fds, uffdFDs(t), "no userfaultfd left")
			goroutinesSettle(t, goroutines)
			_, mapped := testenv.VMAAt(t, host)
			require.False(t, mapped, "guest memory is unmapped")
			maps, err := os.ReadFile("/proc/self/maps")
			require.NoError(t, err)
			require.NotContains(t, string(maps), "od-cancel")
		})
	}
}

// A working set recorded on one restore, replayed on the next: the faults
// the handlers serve drop by 90% or more.
func TestRestoreOnDemandWorkingSet(t *testing.T) {
	ctx := context.Background()
	size := uint64(64 * mib)
	layout := guestmem.Layout{{GPA: 0, Size: size}}
	m := newMemory(t, layout)
	fillPattern(t, m, size)
	var buf bytes.Buffer
	_, err := m.Save(ctx, &buf, guestmem.SaveOptions{})
	require.NoError(t, err)
	require.NoError(t, m.Close())
	// The "guest" touches 200 scattered pages, in a fixed order.
	rng := rand.New(rand.NewPCG(1, 2))
	pattern := make([]guestmem.GuestAddress, 200)
	for i := range pattern {
		pattern[i] = guestmem.GuestAddress(rng.Uint64N(size/4096) * 4096)
	}
	replay := func(m *guestmem.Memory) {
		for _, a := range pattern {
			b, err := kernelRead(t, m, a, 8)
			require.NoError(t, err)
			require.Equal(t, uint64(a)|1, leUint64(b))
		}
	}

	m1, od1, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(buf.Bytes())},
		guestmem.OnDemandOptions{Fillers: -1})
	require.NoError(t, err)
	replay(m1)
	without := od1.Progress().FaultFetches
	ws := od1.WorkingSet()
	require.NoError(t, m1.Close())
	require.NotEmpty(t, ws.Spans)
	require.GreaterOrEqual(t, uint64(len(ws.Spans)), without, "every unit a fault fetched is in the working set")

	var file bytes.Buffer
	_, err = ws.WriteTo(&file)
	require.NoError(t, err)
	ws2, err := guestmem.ReadWorkingSet(bytes.NewReader(file.Bytes()))
	require.NoError(t, err)
	require.Equal(t, ws, ws2)

	m2, od2, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(buf.Bytes())},
		guestmem.OnDemandOptions{WorkingSet: ws2, Fillers: 1})
	require.NoError(t, err)
	defer m2.Close()
	require.NoError(t, od2.WaitWorkingSet(ctx))
	replay(m2)
	with := od2.Progress().FaultFetches
	t.Logf("faults served from the source: %d without the working set, %d with", without, with)
	require.LessOrEqual(t, with*10, without, "prefetch removes at least 90%% of the faults")
	require.NoError(t, od2.Wait(ctx))
}

// fillPattern writes, at the start of every page of [0, size), its address | 1.
func fillPattern(t testing.TB, m *guestmem.Memory, size uint64) {
	t.Helper()
	for a := uint64(0); a < size; a += 4096 {
		require.NoError(t, m.WriteUint64(guestmem.GuestAddress(a), a|1))
	}
}

func TestReadWorkingSetRejectsDamage(t *testing.T) {
	ws := &guestmem.WorkingSet{Snapshot: [16]byte{7}, Spans: []guestmem.Span{{GPA: 0, Size: 4096}, {GPA: 1 << 20, Size: 8192}}}
	var b bytes.Buffer
	_, err := ws.WriteTo(&b)
	require.NoError(t, err)
	good := b.Bytes()
	_, err = guestmem.ReadWorkingSet(bytes.NewReader(good[:len(good)-1]))
	require.ErrorIs(t, err, guestmem.ErrSnapshotTruncated)
	bad := bytes.Clone(good)
	bad[40] ^= 1
	_, err = guestmem.ReadWorkingSet(bytes.NewReader(bad))
	require.ErrorIs(t, err, guestmem.ErrSnapshotChecksum)
	_, err = guestmem.ReadWorkingSet(strings.NewReader("GMEMSNAP" + strings.Repeat("\x00", 40)))
	require.ErrorIs(t, err, guestmem.ErrSnapshotFormat)
}

// Under -race: kernel faults, host reads and writes, discards and the
// fillers, all at once.
func TestRestoreOnDemandConcurrent(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, false)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{Fillers: 1, Handlers: 3})
	require.NoError(t, err)
	defer m.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	// Readers of region 0's first 4 MiB, which nothing else changes.
	for g := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := g * 4096; off < 4*mib; off += 3 * 4096 {
				var b []byte
				var err error
				if g == 0 {
					b, err = kernelRead(t, m, guestmem.GuestAddress(off), 4096)
				} else {
					b = make([]byte, 4096)
					_, err = m.ReadAt(b, int64(off))
				}
				if err == nil && !bytes.Equal(b, want[off:off+4096]) {
					err = fmt.Errorf("page %#x differs", off)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	// A writer and a discarder on region 0's upper half.
	wg.Add(2)
	go func() {
		defer wg.Done()
		for off := 4 * mib; off < 6*mib; off += 4096 {
			if err := m.WriteUint64(guestmem.GuestAddress(off), 0xabcd); err != nil {
				errs <- err
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for off := 6 * mib; off < 8*mib; off += 64 << 10 {
			if err := m.Discard(guestmem.GuestAddress(off), 4096); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.NoError(t, od.Wait(ctx))
	for off := 4 * mib; off < 6*mib; off += 4096 {
		v, err := m.ReadUint64(guestmem.GuestAddress(off))
		require.NoError(t, err)
		require.Equal(t, uint64(0xabcd), v)
	}
	for off := 6 * mib; off < 8*mib; off += 64 << 10 {
		b := make([]byte, 4096)
		_, err := m.ReadAt(b, int64(off))
		require.NoError(t, err)
		require.Equal(t, make([]byte, 4096), b, "discarded at %#x", off)
	}
}

// Save cuts data records at every 256 KiB of guest address, so a fault
// fetches at most that much.
func TestSaveCutsRecordsAtFillUnits(t *testing.T) {
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 4 * mib}})
	_, err := m.WriteAt(bytes.Repeat([]byte{9}, 4*mib), 0)
	require.NoError(t, err)
	for _, compress := range []bool{false, true} {
		var buf bytes.Buffer
		_, err = m.Save(context.Background(), &buf, guestmem.SaveOptions{Compress: compress})
		require.NoError(t, err)
		info, err := guestmem.Verify(context.Background(), &buf)
		require.NoError(t, err)
		require.Equal(t, uint64(16), info.Records, "4 MiB of data in 256 KiB records (compress=%v)", compress)
	}
}

// Dirty tracking on a lazily restored guest sees the writes made after the
// restore, not the fills.
func TestRestoreOnDemandDirtyTracking(t *testing.T) {
	ctx := context.Background()
	stream, want := odSnapshot(t, false)
	m, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(stream)},
		guestmem.OnDemandOptions{Fillers: -1})
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	_, err = kernelRead(t, m, 0, 64<<10) // fills, not writes
	require.NoError(t, err)
	require.NoError(t, m.WriteUint64(3*mib, 7))
	d, err := m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.Span{{GPA: 3 * mib, Size: 4096}}, spans(d))
	require.NoError(t, od.Fill(ctx))
	require.NoError(t, od.Wait(ctx))
	d, err = m.CollectDirty()
	require.NoError(t, err)
	require.Empty(t, spans(d), "filling the rest dirtied nothing")
	copy(want[3*mib:], []byte{7, 0, 0, 0, 0, 0, 0, 0})
	require.True(t, bytes.Equal(want, image(t, m)))
}
