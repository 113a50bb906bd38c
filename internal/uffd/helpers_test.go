//go:build linux

package uffd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"runtime/debug"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

const page = 4096

// backing is a kind of memory a test maps and registers.
type backing struct {
	name     string
	pageSize int
	need     Features
	mmap     func(t testing.TB, size int) []byte
}

var backings = []backing{
	{name: "anon", pageSize: page, mmap: mapAnon},
	{name: "memfd", pageSize: page, need: FeatureMissingShmem, mmap: mapMemfd},
	{name: "hugetlb", pageSize: 2 << 20, need: FeatureMissingHugetlbfs, mmap: mapHugetlb},
}

// mapAnon maps private anonymous memory, unmapped at cleanup.
func mapAnon(t testing.TB, size int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	require.NoError(t, err)
	// Transparent hugepages would fill whole 2 MiB on first touch elsewhere;
	// registered missing faults are served a base page at a time anyway.
	_ = unix.Madvise(b, unix.MADV_NOHUGEPAGE)
	t.Cleanup(func() { unmap(b) })
	return b
}

// mapMemfd maps a shared memfd (shmem), unmapped and closed at cleanup.
func mapMemfd(t testing.TB, size int) []byte {
	t.Helper()
	return mapFD(t, size, unix.MFD_CLOEXEC)
}

// mapHugetlb maps a shared MFD_HUGETLB memfd of 2 MiB pages, skipping
// without a pool to take them from.
func mapHugetlb(t testing.TB, size int) []byte {
	t.Helper()
	testenv.NeedHugetlbPages(t, size/(2<<20))
	return mapFD(t, size, unix.MFD_CLOEXEC|unix.MFD_HUGETLB|unix.MFD_HUGE_2MB)
}

func mapFD(t testing.TB, size int, flags int) []byte {
	fd, err := unix.MemfdCreate("uffd-test", flags)
	require.NoError(t, err)
	defer unix.Close(fd) // the mapping keeps the file
	require.NoError(t, unix.Ftruncate(fd, int64(size)))
	b, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if errors.Is(err, unix.ENOMEM) && flags&unix.MFD_HUGETLB != 0 {
		// The pool had the pages when NeedHugetlbPages looked; another
		// process (a concurrent go test) took them since.
		testenv.Skip(t, "hugetlb pool exhausted mapping %d bytes: %v", size, err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { unmap(b) })
	return b
}

var unmapped sync.Map // first byte's address -> struct{}: unmapped by the test itself

func unmap(b []byte) {
	if _, done := unmapped.LoadOrStore(addrOf(b), struct{}{}); !done {
		_ = unix.Munmap(b)
	}
}

// open opens a userfaultfd for a test, asking for what the backing needs,
// and closes it at cleanup.
func open(t testing.TB, cfg Config) *Userfaultfd {
	t.Helper()
	u, err := Open(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = u.Close() })
	return u
}

// openFor opens a userfaultfd that can serve the backing, with the events
// the tests use, and registers mem.
func openFor(t testing.TB, b backing, fb Fallback, mem []byte) *Userfaultfd {
	t.Helper()
	u := open(t, Config{Required: b.need | FeatureEventRemove, Optional: FeatureThreadID | FeatureExactAddress, Fallback: fb})
	io, err := u.Register(addrOf(mem), uintptr(len(mem)))
	require.NoError(t, err)
	require.NotZero(t, io&IoctlCopy, "range ioctls %v", io)
	return u
}

// source is the snapshot a test serves: random pages, every fourth one zero.
func source(size, pageSize int, seed uint64) []byte {
	src := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, 1))
	for p := 0; p < size/pageSize; p++ {
		if p%4 == 3 {
			continue
		}
		chunk := src[p*pageSize : (p+1)*pageSize]
		for i := 0; i < len(chunk); i += 8 {
			v := r.Uint64() | 1 // never an all-zero page
			for j := range 8 {
				chunk[i+j] = byte(v >> (8 * j))
			}
		}
	}
	return src
}

// snapshotHandler serves faults of mem from src: Copy for data pages,
// ZeroPage for zero pages and for pages removed since.
type snapshotHandler struct {
	u    *Userfaultfd
	mem  []byte
	src  []byte
	mu   sync.Mutex
	gone map[uintptr]bool // removed pages: zeros from now on
	seen []Event
}

func newSnapshotHandler(u *Userfaultfd, mem, src []byte) *snapshotHandler {
	return &snapshotHandler{u: u, mem: mem, src: src, gone: map[uintptr]bool{}}
}

func (h *snapshotHandler) handle(ev Event) error {
	h.mu.Lock()
	h.seen = append(h.seen, ev)
	base := addrOf(h.mem)
	switch ev.Kind {
	case Remove, Unmap:
		for p := ev.Start; p < ev.End; p += page {
			h.gone[p] = true
		}
		h.mu.Unlock()
		return nil
	}
	gone := h.gone[ev.Page]
	h.mu.Unlock()
	if ev.Kind != PageFault {
		return fmt.Errorf("unexpected %v", ev)
	}
	off := ev.Page - base
	data := h.src[off : off+ev.PageSize]
	if gone || isZero(data) {
		_, err := h.u.ZeroPage(ev.Page, ev.PageSize, WakeWaiters)
		return err
	}
	_, err := h.u.Copy(ev.Page, data, WakeWaiters)
	return err
}

func (h *snapshotHandler) events(kind Kind) []Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	var evs []Event
	for _, ev := range h.seen {
		if ev.Kind == kind || kind == 0 {
			evs = append(evs, ev)
		}
	}
	return evs
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// serve runs n Serve loops until the test ends; wait stops them and
// returns their errors.
func serve(t testing.TB, u *Userfaultfd, n int, h Handler) (stop func() []error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errs := make(chan error, n)
	for range n {
		go func() { errs <- u.Serve(ctx, h) }()
	}
	var once sync.Once
	var out []error
	stop = func() []error {
		once.Do(func() {
			cancel()
			for range n {
				if err := <-errs; err != nil && !errors.Is(err, context.Canceled) {
					out = append(out, err)
				}
			}
		})
		return out
	}
	t.Cleanup(func() { stop() })
	return stop
}

//go:noinline
func load(p *byte) byte { return *p }

//go:noinline
func store(p *byte, v byte) { *p = v }

// touch reads (or, with write, writes) the first byte of each listed page
// of mem, on a goroutine locked to its own OS thread, since a faulting
// thread stops until the page is served. The access is a plain Go load or
// store, which asynchronous preemption can interrupt (see the package doc).
// It reports the thread id, then a fault caught as an error (SIGBUS from a
// poisoned page) or nil, on the returned channel.
func touch(mem []byte, pageSize int, pages []int, write bool) (tid <-chan int, done <-chan error) {
	tidc, donec := make(chan int, 1), make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tidc <- unix.Gettid()
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		var err error
		func() {
			defer func() {
				if r := recover(); r != nil {
					err = &touchFault{r: r}
				}
			}()
			for _, p := range pages {
				if write {
					store(&mem[p*pageSize], 0xAB)
				} else {
					_ = load(&mem[p*pageSize])
				}
			}
		}()
		donec <- err
	}()
	return tidc, donec
}

// morePs raises GOMAXPROCS by n for the test: a goroutine stopped in a
// userfault inside Go code keeps its P, so n such touchers would otherwise
// leave the Serve loops without one until sysmon preempts a toucher (up to
// 10-20ms each time; see the package doc).
func morePs(t testing.TB, n int) {
	old := runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + n)
	t.Cleanup(func() { runtime.GOMAXPROCS(old) })
}

// shuffled is 0..n-1 in a random order.
func shuffled(n int, seed uint64) []int {
	r := rand.New(rand.NewPCG(seed, 2))
	return r.Perm(n)
}

// waitQueued waits until u has an event queued (its descriptor is readable).
func waitQueued(t testing.TB, u *Userfaultfd) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		pfd := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}}
		if n, _ := unix.Poll(pfd, 10); n > 0 {
			return
		}
	}
	t.Fatal("no event queued after 5s")
}

// within fails the test if ch yields nothing within d.
func within[T any](t testing.TB, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("%s: nothing after %v", what, d)
		panic("unreachable")
	}
}

func requireSame(t testing.TB, want, got []byte, pageSize int) {
	t.Helper()
	if bytes.Equal(want, got) {
		return
	}
	for p := 0; p < len(want)/pageSize; p++ {
		w, g := want[p*pageSize:(p+1)*pageSize], got[p*pageSize:(p+1)*pageSize]
		if !bytes.Equal(w, g) {
			t.Fatalf("page %d differs from the source (first bytes %x, want %x)", p, g[:8], w[:8])
		}
	}
}

// touchFault is a memory fault the toucher caught (debug.SetPanicOnFault).
type touchFault struct{ r any }

func (f *touchFault) Error() string { return fmt.Sprintf("fault at %#x: %v", f.addr(), f.r) }

// addr is the faulting address the runtime reported.
func (f *touchFault) addr() uintptr {
	if a, ok := f.r.(interface{ Addr() uintptr }); ok {
		return a.Addr()
	}
	return 0
}

// requireFaultAt checks that err is a fault the toucher caught at addr.
func requireFaultAt(t testing.TB, err error, addr uintptr) {
	t.Helper()
	var f *touchFault
	require.ErrorAs(t, err, &f)
	require.Equal(t, addr, f.addr(), "fault address")
}

// kernelResult is what a kernelRead got.
type kernelResult struct {
	data []byte
	err  error
}

// kernelRead has the kernel read b, on a goroutine of its own: write(2) of
// b into a pipe, drained by another goroutine. A missing page of b then
// faults in the kernel, in the system call — as KVM's accesses do — where
// the Go runtime's preemption signals do not reach it.
func kernelRead(t testing.TB, b []byte) <-chan kernelResult {
	t.Helper()
	var p [2]int
	require.NoError(t, unix.Pipe2(p[:], unix.O_CLOEXEC))
	out := make(chan kernelResult, 1)
	got := make(chan []byte, 1)
	go func() {
		d := make([]byte, 0, len(b))
		buf := make([]byte, 64<<10)
		for {
			n, err := unix.Read(p[0], buf)
			if n <= 0 || err != nil {
				break
			}
			d = append(d, buf[:n]...)
		}
		unix.Close(p[0])
		got <- d
	}()
	go func() {
		_, err := unix.Write(p[1], b)
		unix.Close(p[1])
		out <- kernelResult{data: <-got, err: err}
	}()
	return out
}
