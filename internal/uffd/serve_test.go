//go:build linux

package uffd

import (
	"bytes"
	"errors"
	"io/fs"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// Faults on each backing are served from a source buffer, by several Serve
// loops at once, and the toucher reads exactly the source's data.
func TestServeFromSource(t *testing.T) {
	for _, b := range backings {
		t.Run(b.name, func(t *testing.T) {
			pages := 64
			if b.pageSize > page {
				pages = 4
			}
			size := pages * b.pageSize
			mem := b.mmap(t, size)
			u := openFor(t, b, Poison, mem)
			src := source(size, b.pageSize, 1)
			h := newSnapshotHandler(u, mem, src)
			stop := serve(t, u, 4, h.handle)

			_, done := touch(mem, b.pageSize, shuffled(pages, 1), false)
			require.NoError(t, within(t, done, 10*time.Second, "toucher"))
			requireSame(t, src, mem, b.pageSize)
			require.Empty(t, stop())

			// Every page faulted. A page may fault more than once: a signal
			// (the Go runtime's preemption) interrupts the wait, and the
			// retried access faults again; its second Copy finds the page
			// present.
			faults := h.events(PageFault)
			faulted := map[uintptr]bool{}
			for _, ev := range faults {
				faulted[ev.Page] = true
			}
			require.Len(t, faulted, pages, "every page faulted")
			for _, ev := range faults {
				require.EqualValues(t, b.pageSize, ev.PageSize)
				require.Zero(t, ev.Page%uintptr(b.pageSize))
				require.False(t, ev.Write())
			}
			require.NoError(t, u.Unregister(addrOf(mem), uintptr(size)))
			require.NoError(t, u.Close())
		})
	}
}

// Servers racing on the same page: one fill wins, the rest get ErrPresent
// (also fs.ErrExist), and the page holds exactly the winner's data, never a
// mix. Threads waiting on the pages are woken.
func TestRacingCopiesOnOnePage(t *testing.T) {
	const pages, racers = 32, 6
	morePs(t, pages)
	mem := mapAnon(t, pages*page)
	u := openFor(t, backings[0], Poison, mem)
	patterns := make([][]byte, racers)
	for k := range patterns {
		patterns[k] = source(page, page, uint64(100+k))
	}
	// Threads wait on every page before the racers start.
	var waiting []<-chan error
	for p := range pages {
		_, done := touch(mem, page, []int{p}, false)
		waiting = append(waiting, done)
	}
	var wins, present atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for k := range racers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for p := range pages {
				n, err := u.Copy(addrOf(mem)+uintptr(p*page), patterns[k], WakeWaiters)
				switch {
				case err == nil:
					require.Equal(t, page, n)
					wins.Add(1)
				case errors.Is(err, ErrPresent):
					require.ErrorIs(t, err, fs.ErrExist)
					require.ErrorIs(t, err, unix.EEXIST)
					require.Zero(t, n)
					present.Add(1)
				default:
					t.Errorf("Copy page %d: %v", p, err)
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	require.EqualValues(t, pages, wins.Load(), "one winner per page")
	require.EqualValues(t, pages*(racers-1), present.Load())
	for p, done := range waiting {
		require.NoError(t, within(t, done, 5*time.Second, "waiting thread"))
		got := mem[p*page : (p+1)*page]
		match := 0
		for _, pat := range patterns {
			if bytes.Equal(got, pat) {
				match++
			}
		}
		require.Equal(t, 1, match, "page %d holds exactly one racer's data", p)
	}
	require.NoError(t, u.Unregister(addrOf(mem), pages*page))
}

// Many threads fault the same pages at once and several Serve loops serve
// them: each waiting thread has its own fault event, the duplicates meet
// ErrPresent, which serves them, and every thread reads the source.
func TestConcurrentFaultsOnSamePages(t *testing.T) {
	const pages, threads = 32, 8
	morePs(t, threads)
	mem := mapAnon(t, pages*page)
	u := openFor(t, backings[0], Poison, mem)
	src := source(pages*page, page, 7)
	var present atomic.Int64
	h := newSnapshotHandler(u, mem, src)
	stop := serve(t, u, 4, func(ev Event) error {
		time.Sleep(200 * time.Microsecond) // let the other threads pile up on the page // let the other threads pile up on the page
		err := h.handle(ev)
		if errors.Is(err, ErrPresent) {
			present.Add(1)
		}
		return err
	})
	order := shuffled(pages, 7)
	var dones []<-chan error
	for range threads {
		_, done := touch(mem, page, order, false)
		dones = append(dones, done)
	}
	for _, done := range dones {
		require.NoError(t, within(t, done, 10*time.Second, "toucher"))
	}
	requireSame(t, src, mem, page)
	require.Empty(t, stop())
	t.Logf("%d faults on %d pages, %d found the page already present", len(h.events(PageFault)), pages, present.Load())
	require.Positive(t, present.Load(), "some faults raced")
	require.NoError(t, u.Unregister(addrOf(mem), pages*page))
}

// MADV_DONTNEED (anonymous) and MADV_REMOVE (memfd, hugetlb) on a
// registered range queue a Remove event, and the madvise waits until it is
// read. The range stays registered: its pages fault again and are served
// zeros, the rest keeps the source's data. The madvise returns when the
// event is read, before its handler has run; Serve still hands the faults
// that follow to a handler only after the Remove (checked with a slow Remove
// handler and four Serve loops, several rounds).
func TestRemoveEvent(t *testing.T) {
	for _, b := range backings {
		t.Run(b.name, func(t *testing.T) {
			rounds := 20
			if b.pageSize > page {
				rounds = 3
			}
			for round := range rounds {
				removeRound(t, b, uint64(round))
			}
		})
	}
}

func removeRound(t *testing.T, b backing, seed uint64) {
	const pages = 4
	size := pages * b.pageSize
	mem := b.mmap(t, size)
	u := openFor(t, b, Poison, mem)
	require.NotZero(t, u.Features()&FeatureEventRemove)
	src := source(size, b.pageSize, seed)
	for p := range pages { // no zero pages: a zero read below means removed
		src[p*b.pageSize] |= 1
	}
	h := newSnapshotHandler(u, mem, src)
	stop := serve(t, u, 4, func(ev Event) error {
		if ev.Kind == Remove {
			time.Sleep(2 * time.Millisecond) // widen the window a fault could overtake it in
		}
		return h.handle(ev)
	})
	_, done := touch(mem, b.pageSize, shuffled(pages, seed), false)
	require.NoError(t, within(t, done, 10*time.Second, "toucher"))
	requireSame(t, src, mem, b.pageSize)

	advice := unix.MADV_REMOVE
	if b.name == "anon" {
		advice = unix.MADV_DONTNEED
	}
	gone := mem[b.pageSize : 3*b.pageSize]
	madvised := make(chan error, 1)
	go func() { madvised <- unix.Madvise(gone, advice) }()
	require.NoError(t, within(t, madvised, 10*time.Second, "madvise"))
	before := len(h.events(PageFault))
	_, done = touch(mem, b.pageSize, []int{1, 2, 0, 3}, false)
	require.NoError(t, within(t, done, 10*time.Second, "toucher after remove"))
	require.True(t, isZero(gone), "round %d: removed pages are served zeros", seed)
	requireSame(t, src[:b.pageSize], mem[:b.pageSize], b.pageSize)
	requireSame(t, src[3*b.pageSize:], mem[3*b.pageSize:], b.pageSize)

	removes := h.events(Remove)
	require.Len(t, removes, 1)
	require.Equal(t, addrOf(gone), removes[0].Start)
	require.Equal(t, addrOf(gone)+uintptr(len(gone)), removes[0].End)
	refaulted := map[uintptr]bool{}
	for _, ev := range h.events(PageFault)[before:] {
		refaulted[ev.Page] = true
	}
	require.True(t, refaulted[addrOf(gone)] && refaulted[addrOf(gone)+uintptr(b.pageSize)], "the removed pages fault again")
	require.Empty(t, stop())
	require.NoError(t, u.Unregister(addrOf(mem), uintptr(size)))
	require.NoError(t, u.Close())
	unmap(mem)
}

// While a Remove is queued (its madvise waiting), Copy fails with ErrAgain;
// a handler returning it defers the fault, Serve hands the Remove to the
// handler first, and the retried fault is served.
func TestAgainDefersFault(t *testing.T) {
	mem := mapAnon(t, 4*page)
	u := openFor(t, backings[0], Poison, mem)
	src := source(4*page, page, 5)
	src[0] = 1
	var mu sync.Mutex
	var log []string
	madvised := make(chan error, 1)
	first := true
	handler := func(ev Event) error {
		mu.Lock()
		defer mu.Unlock()
		if ev.Kind == Remove {
			log = append(log, "remove")
			return nil
		}
		if first {
			first = false
			// Queue a Remove behind this fault, and wait until it is in
			// flight: a fill of page 1, which nobody touches, then fails
			// with ErrAgain. (Before that it fills page 1, or finds it
			// present.)
			go func() { madvised <- unix.Madvise(mem[2*page:], unix.MADV_DONTNEED) }()
			for {
				_, err := u.ZeroPage(addrOf(mem)+page, page, DontWake)
				if errors.Is(err, ErrAgain) {
					break
				}
				time.Sleep(time.Millisecond)
			}
		}
		_, err := u.Copy(ev.Page, src[ev.Page-addrOf(mem):][:page], WakeWaiters)
		switch {
		case errors.Is(err, ErrAgain):
			require.ErrorIs(t, err, unix.EAGAIN)
			log = append(log, "again")
		case err == nil:
			log = append(log, "copied")
		}
		return err
	}
	stop := serve(t, u, 1, handler)
	_, done := touch(mem, page, []int{0}, false)
	require.NoError(t, within(t, done, 10*time.Second, "toucher"))
	require.NoError(t, within(t, madvised, 10*time.Second, "madvise"))
	require.Empty(t, stop())
	require.Equal(t, src[:page], mem[:page])
	mu.Lock()
	defer mu.Unlock()
	require.GreaterOrEqual(t, len(log), 3)
	require.Equal(t, "again", log[0])
	require.Equal(t, "remove", log[1], "the Remove reaches the handler before the retry")
	require.Equal(t, "copied", log[len(log)-1])
	require.NoError(t, u.Unregister(addrOf(mem), 4*page))
}

// munmap of a registered range queues an Unmap event (FeatureEventUnmap)
// and waits until it is read; the range is then no longer registered, and
// Close has nothing to report.
func TestUnmapEvent(t *testing.T) {
	mem := mapAnon(t, 8*page)
	u := open(t, Config{Required: FeatureEventUnmap, Fallback: Poison})
	_, err := u.Register(addrOf(mem), 8*page)
	require.NoError(t, err)
	h := newSnapshotHandler(u, mem, source(8*page, page, 9))
	stop := serve(t, u, 1, h.handle)
	_, done := touch(mem, page, []int{0, 1}, false)
	require.NoError(t, within(t, done, 5*time.Second, "toucher"))
	unmapped := make(chan error, 1)
	go func() { unmapped <- unix.Munmap(mem); unmap(mem) }()
	require.NoError(t, within(t, unmapped, 5*time.Second, "munmap"))
	require.Empty(t, stop())
	evs := h.events(Unmap)
	require.Len(t, evs, 1)
	require.Equal(t, addrOf(mem), evs[0].Start)
	require.Equal(t, addrOf(mem)+8*page, evs[0].End)
	require.NoError(t, u.Close(), "the unmapped range is no longer registered")
}

// Without FeatureEventUnmap, munmap drops the registration silently: Close
// does not report the range, and memory mapped anew there registers again.
func TestUnmapWithoutEvent(t *testing.T) {
	mem := mapAnon(t, 8*page)
	u := open(t, Config{Fallback: Poison})
	_, err := u.Register(addrOf(mem), 8*page)
	require.NoError(t, err)
	addr := addrOf(mem)
	require.NoError(t, unix.Munmap(mem))
	unmap(mem)
	again, err := unix.MmapPtr(-1, 0, unsafePointerAt(addr), 8*page, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE)
	require.NoError(t, err)
	t.Cleanup(func() { _ = unix.MunmapPtr(again, 8*page) })
	_, err = u.Register(addr, 4*page)
	require.NoError(t, err, "the new mapping registers")
	require.NoError(t, u.Unregister(addr, 4*page))
	require.NoError(t, u.Close(), "nothing is registered any more")
}
