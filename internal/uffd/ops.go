//go:build linux

package uffd

import (
	"errors"
	"fmt"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Mode modifies Copy, ZeroPage and Poison.
type Mode uint64

const (
	// WakeWaiters (the zero Mode) wakes the threads waiting on the range
	// once it is filled.
	WakeWaiters Mode = 0
	// DontWake fills the range without waking its waiters (the
	// UFFDIO_*_MODE_DONTWAKE flag): fill a batch, then Wake it once.
	DontWake Mode = modeDontWake
)

// checkRange validates a page-aligned, non-empty, non-wrapping range.
func (u *Userfaultfd) checkRange(op string, addr, n uintptr) error {
	switch {
	case n == 0:
		return invalid(op, "empty range at %#x", addr)
	case addr%u.basePage != 0 || n%u.basePage != 0:
		return invalid(op, "[%#x, +%#x) is not aligned to the %d-byte page", addr, n, u.basePage)
	case addr+n < addr:
		return invalid(op, "[%#x, +%#x) wraps around the address space", addr, n)
	}
	return nil
}

// Register arms [addr, addr+n) for missing-page faults
// (UFFDIO_REGISTER_MODE_MISSING) and returns the ioctls the kernel supports
// on it. The range must be mapped, page-aligned (huge-page-aligned on hugetlb
// memory), private anonymous, shmem (FeatureMissingShmem) or hugetlbfs
// (FeatureMissingHugetlbfs) memory, and not registered with another
// userfaultfd (EBUSY); registering it again here is allowed. From now on a
// thread touching a page of the range that is not present waits until the
// page is served.
//
// With the Poison fallback the range must support UFFDIO_POISON; if it does
// not, it is unregistered again and the error wraps errors.ErrUnsupported.
func (u *Userfaultfd) Register(addr, n uintptr) (Ioctls, error) {
	if err := u.checkRange("Register", addr, n); err != nil {
		return 0, err
	}
	fd, err := u.enter("Register")
	if err != nil {
		return 0, err
	}
	defer u.leave()
	u.rmu.Lock() // lock order: u.mu, then u.rmu
	defer u.rmu.Unlock()
	reg := uffdioRegister{rng: uffdioRange{start: uint64(addr), len: uint64(n)}, mode: registerModeMissing}
	if e := ioctlRegisterArg(fd, &reg); e != 0 {
		return 0, opError("Register", "UFFDIO_REGISTER", addr, n, 0, e)
	}
	ioctls := Ioctls(reg.ioctls)
	undo := func(err error) (Ioctls, error) {
		rng := uffdioRange{start: uint64(addr), len: uint64(n)}
		ioctlRange(fd, ioctlUnregister, &rng)
		return 0, err
	}
	r := region{start: addr, end: addr + n, pageSize: u.basePage, ioctls: ioctls}
	// Only hugetlb ranges lack UFFDIO_ZEROPAGE; only they have another page size.
	if ioctls&IoctlZeroPage == 0 {
		ps, err := kernelPageSize(addr, addr+n)
		if err != nil {
			return undo(err)
		}
		r.pageSize = ps
	}
	if u.fallback == Poison && ioctls&IoctlPoison == 0 {
		return undo(fmt.Errorf("uffd: Register [%#x, +%#x): the range has no UFFDIO_POISON (it offers %v), which the Poison fallback needs: %w",
			addr, n, ioctls, errors.ErrUnsupported))
	}
	// Registering again what this userfaultfd has is allowed; what it had
	// and lost (unmapped without an Unmap event) may have been mapped anew.
	u.untrack(r.start, r.end)
	u.track(r)
	return ioctls, nil
}

// Unregister disarms [addr, addr+n). The kernel wakes the threads waiting
// there, and they, like every later access, take the normal fault path: a
// page never served reads as zeros on anonymous memory and as the page cache
// (or zeros) on shmem and hugetlbfs. Call it once every data page of the
// range is served, or when falling back to the normal fault path is meant.
func (u *Userfaultfd) Unregister(addr, n uintptr) error {
	if err := u.checkRange("Unregister", addr, n); err != nil {
		return err
	}
	fd, err := u.enter("Unregister")
	if err != nil {
		return err
	}
	defer u.leave()
	u.rmu.Lock()
	defer u.rmu.Unlock()
	rng := uffdioRange{start: uint64(addr), len: uint64(n)}
	if e := ioctlRange(fd, ioctlUnregister, &rng); e != 0 {
		return opError("Unregister", "UFFDIO_UNREGISTER", addr, n, 0, e)
	}
	u.untrack(addr, addr+n)
	return nil
}

// Copy atomically fills the pages at dst with src (UFFDIO_COPY) and, unless
// mode is DontWake, wakes the threads waiting on them. It returns the bytes
// copied. dst and len(src) must be multiples of the range's page size.
//
// A partial copy the kernel reports (EAGAIN with a positive count) is
// continued from where it stopped. Errors wrap: ErrPresent at the first page
// already present (the waiters there are woken unless DontWake), ErrAgain
// when the address space is changing (read events, then retry the rest),
// ErrUnmapped and ErrExited when the memory or its process went away.
func (u *Userfaultfd) Copy(dst uintptr, src []byte, mode Mode) (int, error) {
	if err := u.checkRange("Copy", dst, uintptr(len(src))); err != nil {
		return 0, err
	}
	if mode&^DontWake != 0 {
		return 0, invalid("Copy", "unknown mode %#x", uint64(mode))
	}
	fd, err := u.enter("Copy")
	if err != nil {
		return 0, err
	}
	defer u.leave()
	return u.copy(fd, dst, src, mode)
}

func (u *Userfaultfd) copy(fd int, dst uintptr, src []byte, mode Mode) (int, error) {
	done := 0
	for {
		n, e := ioctlCopyArg(fd, dst+uintptr(done), src[done:], uint64(mode))
		if e == 0 {
			return len(src), nil
		}
		if n > 0 {
			done += int(n)
			if e == unix.EAGAIN && done < len(src) {
				continue // the kernel stopped part way: go on from there
			}
		}
		if e == unix.EEXIST && mode&DontWake == 0 {
			u.wake(fd, dst+uintptr(done), uintptr(len(src)-done))
		}
		return done, opError("Copy", "UFFDIO_COPY", dst, uintptr(len(src)), done, e)
	}
}

// ZeroPage fills the pages of [dst, dst+n) with zeros (UFFDIO_ZEROPAGE:
// anonymous memory maps the shared zero page until written) and, unless mode
// is DontWake, wakes their waiters. It returns the bytes filled. Hugetlb
// ranges have no UFFDIO_ZEROPAGE; there it copies zeros. Errors as for Copy.
func (u *Userfaultfd) ZeroPage(dst, n uintptr, mode Mode) (int, error) {
	if err := u.checkRange("ZeroPage", dst, n); err != nil {
		return 0, err
	}
	if mode&^DontWake != 0 {
		return 0, invalid("ZeroPage", "unknown mode %#x", uint64(mode))
	}
	fd, err := u.enter("ZeroPage")
	if err != nil {
		return 0, err
	}
	defer u.leave()
	return u.zero(fd, dst, n, mode)
}

func (u *Userfaultfd) zero(fd int, dst, n uintptr, mode Mode) (int, error) {
	if r, ok := u.regionAt(dst); ok && r.ioctls&IoctlZeroPage == 0 {
		// Hugetlb: copy zeros, a huge page at a time.
		z := zeros(r.pageSize)
		done := 0
		for off := uintptr(0); off < n; off += r.pageSize {
			c, err := u.copy(fd, dst+off, z[:min(r.pageSize, n-off)], mode)
			done += c
			if err != nil {
				return done, err
			}
		}
		return done, nil
	}
	return u.fill(fd, "ZeroPage", "UFFDIO_ZEROPAGE", ioctlZeropage, dst, n, mode)
}

// Poison marks the pages of [dst, dst+n) that are not present as poisoned
// (UFFDIO_POISON, Linux 6.6, FeaturePoison) and, unless mode is DontWake,
// wakes their waiters: every access to them raises SIGBUS until the pages
// are discarded or unmapped. It returns the bytes poisoned; a present page
// stops it with ErrPresent. Use it to fail a fault whose data cannot be had.
func (u *Userfaultfd) Poison(dst, n uintptr, mode Mode) (int, error) {
	if err := u.checkRange("Poison", dst, n); err != nil {
		return 0, err
	}
	if mode&^DontWake != 0 {
		return 0, invalid("Poison", "unknown mode %#x", uint64(mode))
	}
	if u.granted&FeaturePoison == 0 {
		return 0, fmt.Errorf("uffd: Poison: FeaturePoison was not granted: %w", errors.ErrUnsupported)
	}
	fd, err := u.enter("Poison")
	if err != nil {
		return 0, err
	}
	defer u.leave()
	return u.fill(fd, "Poison", "UFFDIO_POISON", ioctlPoison, dst, n, mode)
}

// fill issues UFFDIO_ZEROPAGE or UFFDIO_POISON, continuing partial fills.
func (u *Userfaultfd) fill(fd int, op, name string, req uintptr, dst, n uintptr, mode Mode) (int, error) {
	done := uintptr(0)
	for {
		c, e := ioctlFill(fd, req, dst+done, n-done, uint64(mode))
		if e == 0 {
			return int(n), nil
		}
		if c > 0 {
			done += uintptr(c)
			if e == unix.EAGAIN && done < n {
				continue
			}
		}
		if e == unix.EEXIST && mode&DontWake == 0 {
			u.wake(fd, dst+done, n-done)
		}
		return int(done), opError(op, name, dst, n, int(done), e)
	}
}

// Wake wakes the threads waiting on [addr, addr+n) (UFFDIO_WAKE), after
// fills made with DontWake. A woken thread whose page is still missing
// faults again, and a new event is queued.
func (u *Userfaultfd) Wake(addr, n uintptr) error {
	if err := u.checkRange("Wake", addr, n); err != nil {
		return err
	}
	fd, err := u.enter("Wake")
	if err != nil {
		return err
	}
	defer u.leave()
	if e := u.wake(fd, addr, n); e != 0 {
		return opError("Wake", "UFFDIO_WAKE", addr, n, 0, e)
	}
	return nil
}

func (u *Userfaultfd) wake(fd int, addr, n uintptr) syscall.Errno {
	rng := uffdioRange{start: uint64(addr), len: uint64(n)}
	return ioctlRange(fd, ioctlWake, &rng)
}

// resolve resolves the fault ev with the fallback: poisons or zero-fills its
// page. A page found present, unmapped or of an exited process needs nothing
// more than a wake.
func (u *Userfaultfd) resolve(fd int, ev Event) error {
	page, size, _, _ := u.pageOf(ev.Addr)
	var err error
	switch u.fallback {
	case Poison:
		_, err = u.fill(fd, "Poison", "UFFDIO_POISON", ioctlPoison, page, size, WakeWaiters)
	case ZeroFill:
		_, err = u.zero(fd, page, size, WakeWaiters)
	}
	switch {
	case err == nil, errors.Is(err, ErrPresent):
		return nil
	case errors.Is(err, ErrUnmapped), errors.Is(err, ErrExited):
		u.wake(fd, page, size)
		return nil
	}
	return err
}

var zeroPages sync.Map // page size -> []byte of zeros, for hugetlb ZeroFill

// zeros returns a read-only buffer of n zero bytes.
func zeros(n uintptr) []byte {
	if z, ok := zeroPages.Load(n); ok {
		return z.([]byte)
	}
	z, _ := zeroPages.LoadOrStore(n, make([]byte, n))
	return z.([]byte)
}
