//go:build linux

package uffd

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

// useful is every feature this package can ask for.
const useful = FeatureMissingShmem | FeatureMissingHugetlbfs | FeatureEventRemove | FeatureEventUnmap |
	FeatureExactAddress | FeatureThreadID | FeaturePoison

// Open asks for what it is told and reports what it got.
func TestOpenGrantsFeatures(t *testing.T) {
	avail, err := Supported()
	require.NoError(t, err)
	t.Logf("kernel offers: %v", avail)
	u := open(t, Config{Optional: useful, Fallback: ZeroFill})
	t.Logf("granted: %v", u.Features())
	require.Equal(t, useful&avail, u.Features())
	require.Equal(t, ZeroFill, u.Fallback())

	// Required features the kernel has are granted; Poison implies
	// FeaturePoison.
	u = open(t, Config{Required: FeatureEventRemove, Fallback: Poison})
	require.Equal(t, FeatureEventRemove|FeaturePoison, u.Features())
}

// A required feature the kernel lacks is an error wrapping
// errors.ErrUnsupported (a kernel before 6.6 is simulated for Poison).
func TestOpenRequiredFeatureMissing(t *testing.T) {
	avail, err := Supported()
	require.NoError(t, err)
	probed.Lock()
	probed.features = avail &^ (FeatureExactAddress | FeaturePoison)
	probed.Unlock()
	t.Cleanup(func() {
		probed.Lock()
		probed.features = avail
		probed.Unlock()
	})
	_, err = Open(Config{Required: FeatureExactAddress, Fallback: ZeroFill})
	require.ErrorIs(t, err, errors.ErrUnsupported)
	require.ErrorContains(t, err, "EXACT_ADDRESS")
	_, err = Open(Config{Fallback: Poison})
	require.ErrorIs(t, err, errors.ErrUnsupported)
	require.ErrorContains(t, err, "choose ZeroFill")
	// Optional ones are simply not granted.
	u := open(t, Config{Optional: FeatureExactAddress, Fallback: ZeroFill})
	require.Zero(t, u.Features()&FeatureExactAddress)
}

func TestOpenRefusesBadConfig(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no fallback":   {},
		"bad fallback":  {Fallback: 7},
		"SIGBUS":        {Required: FeatureSigbus, Fallback: ZeroFill},
		"fork events":   {Optional: FeatureEventFork, Fallback: ZeroFill},
		"unknown bit":   {Optional: 1 << 40, Fallback: ZeroFill},
		"write-protect": {Required: FeaturePagefaultFlagWP, Fallback: Poison},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Open(cfg)
			require.ErrorIs(t, err, fs.ErrInvalid)
			t.Log(err)
		})
	}
}

// When the system call is refused (vm.unprivileged_userfaultfd=0 without
// CAP_SYS_PTRACE), Open uses /dev/userfaultfd, and what it makes serves
// faults, the kernel's own included; when both are refused, the error says
// so and wraps fs.ErrPermission.
func TestOpenThroughDevice(t *testing.T) {
	if fd, err := unix.Open(devicePath, unix.O_RDWR|unix.O_CLOEXEC, 0); err != nil {
		testenv.Skip(t, "%s not usable here: %v", devicePath, err)
	} else {
		unix.Close(fd)
	}
	saved := sysUserfaultfd
	t.Cleanup(func() { sysUserfaultfd = saved })
	sysUserfaultfd = func(int) (int, error) { return -1, unix.EPERM }

	mem := mapAnon(t, 4*page)
	u := openFor(t, backings[0], Poison, mem)
	src := source(4*page, page, 11)
	stop := serve(t, u, 1, newSnapshotHandler(u, mem, src).handle)
	requireKernelReads(t, mem[2*page:3*page], src[2*page:3*page])
	require.Empty(t, stop())
	require.NoError(t, u.Unregister(addrOf(mem), 4*page))

	savedPath := devicePath
	t.Cleanup(func() { devicePath = savedPath })
	devicePath = "/nonexistent/userfaultfd"
	_, err := newFD()
	require.ErrorIs(t, err, fs.ErrPermission)
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.ErrorContains(t, err, "vm.unprivileged_userfaultfd")
	t.Log(err)
}

// The kernel's own accesses to registered memory (here write(2) reading it
// into a pipe; KVM's are the same) fault and wait like a thread's: the
// userfaultfd is not UFFD_USER_MODE_ONLY.
func TestKernelAccessFaults(t *testing.T) {
	mem := mapMemfd(t, 8*page)
	u := openFor(t, backings[1], Poison, mem)
	src := source(8*page, page, 12)
	stop := serve(t, u, 1, newSnapshotHandler(u, mem, src).handle)
	requireKernelReads(t, mem[page:3*page], src[page:3*page])
	require.Empty(t, stop())
	require.NoError(t, u.Unregister(addrOf(mem), 8*page))
}

// requireKernelReads has the kernel read b (write(2) of b into a pipe) and
// checks it read want.
func requireKernelReads(t *testing.T, b, want []byte) {
	t.Helper()
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	defer w.Close()
	require.NoError(t, unix.SetNonblock(int(w.Fd()), false))
	got := make(chan []byte, 1)
	go func() { d, _ := io.ReadAll(io.LimitReader(r, int64(len(b)))); got <- d }()
	n, err := unix.Write(int(w.Fd()), b)
	require.NoError(t, err)
	require.Equal(t, len(b), n)
	require.Equal(t, want, within(t, got, 5*time.Second, "pipe"))
}

// What a fault event says: the faulting thread, the exact address, a write.
func TestFaultEventDetails(t *testing.T) {
	mem := mapAnon(t, 4*page)
	u := open(t, Config{Optional: FeatureThreadID | FeatureExactAddress, Fallback: Poison})
	_, err := u.Register(addrOf(mem), 4*page)
	require.NoError(t, err)
	evs := make(chan Event, 4)
	stop := serve(t, u, 1, func(ev Event) error {
		evs <- ev
		_, err := u.ZeroPage(ev.Page, ev.PageSize, WakeWaiters)
		return err
	})
	// The write is the kernel's, read(2) into the page: in a race-detector
	// build a Go store is preceded by a nil-check load, a read fault.
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	defer w.Close()
	_, err = w.Write([]byte{7})
	require.NoError(t, err)
	tidc, done := make(chan int, 1), make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tidc <- unix.Gettid()
		_, _ = unix.Read(int(r.Fd()), mem[2*page+0x123:2*page+0x124])
		close(done)
	}()
	tid := <-tidc
	ev := within(t, evs, 5*time.Second, "event")
	within(t, done, 5*time.Second, "writer")
	t.Log(ev)
	require.Equal(t, PageFault, ev.Kind)
	require.True(t, ev.Write(), "a write fault")
	require.Equal(t, addrOf(mem)+2*page, ev.Page)
	require.EqualValues(t, page, ev.PageSize)
	if u.Features()&FeatureExactAddress != 0 {
		require.Equal(t, addrOf(mem)+2*page+0x123, ev.Addr)
	} else {
		require.Equal(t, ev.Page, ev.Addr)
	}
	if u.Features()&FeatureThreadID != 0 {
		require.Equal(t, tid, ev.ThreadID)
	}
	require.EqualValues(t, 7, mem[2*page+0x123])
	t.Log(ev)
	require.Empty(t, stop())
	require.NoError(t, u.Unregister(addrOf(mem), 4*page))
}

// A fill with DontWake leaves the thread waiting until Wake. The waiting
// thread is the kernel's (write(2) reading the page into a pipe): a Go
// thread stopped in a userfault is woken by the runtime's preemption signal
// now and then, and would find the page filled before Wake.
func TestDontWakeThenWake(t *testing.T) {
	mem := mapAnon(t, 4*page)
	u := openFor(t, backings[0], Poison, mem)
	src := source(4*page, page, 13)
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	defer w.Close()
	require.NoError(t, unix.SetNonblock(int(w.Fd()), false))
	wrote := make(chan error, 1)
	go func() { _, err := unix.Write(int(w.Fd()), mem[:page]); wrote <- err }()

	evs := make([]Event, 1)
	n, err := u.ReadEvents(context.Background(), evs)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Equal(t, addrOf(mem), evs[0].Page)
	_, err = u.Copy(evs[0].Page, src[:page], DontWake)
	require.NoError(t, err)
	select {
	case <-wrote:
		t.Fatal("the thread ran before Wake")
	case <-time.After(50 * time.Millisecond):
	}
	require.NoError(t, u.Wake(evs[0].Page, page))
	require.NoError(t, within(t, wrote, 5*time.Second, "write"))
	got := make([]byte, page)
	_, err = io.ReadFull(r, got)
	require.NoError(t, err)
	require.Equal(t, src[:page], got)
	require.NoError(t, u.Unregister(addrOf(mem), 4*page))
}

// Poison fails the pages it marks, and meets present pages with ErrPresent.
func TestPoison(t *testing.T) {
	mem := mapAnon(t, 4*page)
	u := openFor(t, backings[0], Poison, mem)
	_, err := u.ZeroPage(addrOf(mem), page, WakeWaiters)
	require.NoError(t, err)
	n, err := u.Poison(addrOf(mem), 4*page, WakeWaiters)
	require.ErrorIs(t, err, ErrPresent, "page 0 is present")
	require.Zero(t, n)
	n, err = u.Poison(addrOf(mem)+page, 3*page, WakeWaiters)
	require.NoError(t, err)
	require.Equal(t, 3*page, n)
	_, done := touch(mem, page, []int{0, 2}, false)
	requireFaultAt(t, within(t, done, 5*time.Second, "toucher"), addrOf(mem)+2*page)
	// Discarding a poisoned page clears it: it faults again, to be served.
	// (The madvise waits for its Remove event to be read: serve first.)
	h := newSnapshotHandler(u, mem, source(4*page, page, 1))
	stop := serve(t, u, 1, h.handle)
	require.NoError(t, unix.Madvise(mem[2*page:3*page], unix.MADV_DONTNEED))
	_, done = touch(mem, page, []int{2}, false)
	require.NoError(t, within(t, done, 5*time.Second, "toucher after discard"))
	require.Empty(t, stop())
	require.NoError(t, u.Unregister(addrOf(mem), 4*page))

	z := open(t, Config{Fallback: ZeroFill, Optional: 0})
	_, err = z.Poison(addrOf(mem), page, WakeWaiters)
	require.ErrorIs(t, err, errors.ErrUnsupported, "FeaturePoison not granted")
}

// Bad arguments are refused before the kernel sees them; the kernel's
// refusals carry the errno and this package's sentinel.
func TestRangeErrors(t *testing.T) {
	mem := mapAnon(t, 8*page)
	u := openFor(t, backings[0], Poison, mem)
	base := addrOf(mem)

	_, err := u.Register(base, 0)
	require.ErrorIs(t, err, fs.ErrInvalid)
	_, err = u.Register(base+1, page)
	require.ErrorIs(t, err, fs.ErrInvalid)
	_, err = u.Register(^uintptr(0)&^(page-1), 2*page)
	require.ErrorIs(t, err, fs.ErrInvalid, "wraps around")
	_, err = u.Register(base+page, page)
	require.NoError(t, err, "registering again")
	other := mapAnon(t, page)
	u2 := open(t, Config{Fallback: Poison})
	_, err = u2.Register(addrOf(mem), page)
	require.ErrorIs(t, err, unix.EBUSY, "registered with another userfaultfd")
	_, err = u.Copy(base, make([]byte, 100), WakeWaiters)
	require.ErrorIs(t, err, fs.ErrInvalid)
	_, err = u.Copy(base, nil, WakeWaiters)
	require.ErrorIs(t, err, fs.ErrInvalid)
	_, err = u.Copy(base, make([]byte, page), 1<<5)
	require.ErrorIs(t, err, fs.ErrInvalid, "unknown mode")
	require.ErrorIs(t, u.Serve(context.Background(), nil), fs.ErrInvalid)
	_, err = u.ReadEvents(context.Background(), nil)
	require.ErrorIs(t, err, fs.ErrInvalid)

	// Memory not registered here: ENOENT, ErrUnmapped.
	n, err := u.Copy(addrOf(other), make([]byte, page), WakeWaiters)
	require.ErrorIs(t, err, ErrUnmapped)
	require.ErrorIs(t, err, unix.ENOENT)
	require.Zero(t, n)
	var op *OpError
	require.ErrorAs(t, err, &op)
	require.Equal(t, "Copy", op.Op)
	require.Equal(t, addrOf(other), op.Addr)
	t.Log(err)

	// A partial fill stops at the present page and says how far it got.
	_, err = u.Copy(base+2*page, make([]byte, page), WakeWaiters)
	require.NoError(t, err)
	n, err = u.ZeroPage(base, 4*page, WakeWaiters)
	require.ErrorIs(t, err, ErrPresent)
	require.Equal(t, 2*page, n)
	require.ErrorAs(t, err, &op)
	require.Equal(t, 2*page, op.Done)

	// Unregistering part of the range leaves the rest registered: Close
	// names it.
	require.NoError(t, u.Unregister(base, 4*page))
	err = u.Close()
	require.ErrorIs(t, err, ErrRegistered)
	require.ErrorContains(t, err, "1 ranges")
}

// Hugetlb ranges are registered with their huge page size, and fills must
// be aligned to it.
func TestHugetlbPageSize(t *testing.T) {
	mem := mapHugetlb(t, 4<<20)
	u := openFor(t, backings[2], Poison, mem)
	r, ok := u.regionAt(addrOf(mem) + 3<<20)
	require.True(t, ok)
	require.EqualValues(t, 2<<20, r.pageSize)
	require.Zero(t, r.ioctls&IoctlZeroPage, "hugetlb has no UFFDIO_ZEROPAGE")
	_, err := u.Copy(addrOf(mem), make([]byte, page), WakeWaiters)
	require.ErrorIs(t, err, unix.EINVAL, "a base page into a huge page")
	n, err := u.ZeroPage(addrOf(mem)+2<<20, 2<<20, WakeWaiters) // copies zeros
	require.NoError(t, err)
	require.Equal(t, 2<<20, n)
	require.NoError(t, u.Unregister(addrOf(mem), 4<<20))
}

// Nothing is left behind: no descriptor, no goroutine, after Close.
func TestNoLeaks(t *testing.T) {
	// Warm up: the feature probe and the runtime's own goroutines.
	u0, err := Open(Config{Fallback: Poison})
	require.NoError(t, err)
	require.NoError(t, u0.Close())
	fds, gs := testenv.OpenFDs(t), runtime.NumGoroutine()

	for round := range 3 {
		mem := mapMemfd(t, 16*page)
		u, err := Open(Config{Required: FeatureMissingShmem | FeatureEventRemove, Fallback: Poison})
		require.NoError(t, err)
		_, err = u.Register(addrOf(mem), 16*page)
		require.NoError(t, err)
		src := source(16*page, page, uint64(round))
		h := newSnapshotHandler(u, mem, src)
		ctx, cancel := context.WithCancel(context.Background())
		errs := make(chan error, 4)
		for range 3 {
			go func() { errs <- u.Serve(ctx, h.handle) }()
		}
		go func() { // a reader of its own, resolving what it reads
			evs := make([]Event, 2)
			for {
				n, err := u.ReadEvents(ctx, evs)
				if err != nil {
					errs <- err
					return
				}
				for _, ev := range evs[:n] {
					_ = h.handle(ev)
				}
			}
		}()
		_, done := touch(mem, page, shuffled(8, uint64(round)), false)
		require.NoError(t, within(t, done, 5*time.Second, "toucher"))
		if round%2 == 0 {
			// The readers stop on their context; a fault left waiting is
			// resolved by Close.
			cancel()
			for range 4 {
				require.ErrorIs(t, within(t, errs, 5*time.Second, "reader"), context.Canceled)
			}
			read := kernelRead(t, mem[12*page:13*page])
			waitQueued(t, u)
			require.ErrorIs(t, u.Close(), ErrRegistered)
			require.ErrorIs(t, within(t, read, 5*time.Second, "kernel read at Close").err, unix.EFAULT, "poisoned")
		} else {
			// The readers stop on Close.
			require.ErrorIs(t, u.Close(), ErrRegistered)
			for range 4 {
				require.ErrorIs(t, within(t, errs, 5*time.Second, "reader"), fs.ErrClosed)
			}
		}
		cancel()
		unmap(mem)
	}
	require.Equal(t, fds, testenv.OpenFDs(t), "open descriptors")
	// (Not require.Eventually: it runs the condition on a goroutine of its own.)
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > gs && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > gs {
		buf := make([]byte, 1<<16)
		t.Fatalf("goroutines: %d before, %d after:\n%s", gs, n, buf[:runtime.Stack(buf, true)])
	}
}
