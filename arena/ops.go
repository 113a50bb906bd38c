package arena

import (
	"errors"
	"fmt"
	"log"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// The range operations below are crosvm's MemoryMapping operations. Each takes
// an (offset, length) range of the mapping that must be non-empty, in bounds,
// page-aligned (hugetlb-page-aligned over hugetlb memory) and, in an Arena,
// entirely mapped; a violation is a *RangeError wrapping the matching
// sentinel. Syscall failures are *os.SyscallError values naming the call.

// rangeCall validates a mapped range under the read lock and runs the
// syscall call (named name in errors) on its address.
func (m *Mapping) rangeCall(op, name string, off, n int64, call func(addr uintptr, n int64) syscall.Errno) error {
	defer m.runlock(m.rlock())
	if err := m.checkPages(op, off, n, true); err != nil {
		return err
	}
	if errno := call(m.addr+uintptr(off), n); errno != 0 {
		return &OpError{Op: op, Offset: off, Length: n, Err: syscallErr(name, errno)}
	}
	return nil
}

// advise applies madvise(advice) to a validated, mapped range.
func (m *Mapping) advise(op string, off, n int64, advice int) error {
	return m.rangeCall(op, adviceName(advice), off, n, func(a uintptr, n int64) syscall.Errno {
		return sysMadvise(a, n, advice)
	})
}

func (m *Mapping) madvise(op string, off, n int64, advice int) error {
	if errno := sysMadvise(m.addr+uintptr(off), n, advice); errno != 0 {
		return &OpError{Op: op, Offset: off, Length: n, Err: syscallErr(adviceName(advice), errno)}
	}
	return nil
}

// Prefetch asks the kernel to read the range ahead (MADV_WILLNEED) without
// waiting for it: crosvm's async_prefetch. Pages of a file or memfd backing
// become resident in the page cache; nothing is guaranteed to stay resident
// unless the range is also locked.
func (m *Mapping) Prefetch(off, n int64) error {
	return m.advise("Prefetch", off, n, unix.MADV_WILLNEED)
}

// DropPageCache discards the range's pages from this mapping
// (MADV_DONTNEED): crosvm's drop_page_cache. On private memory this is
// destructive, the range reads back as zeros (anonymous) or as the file's
// contents (private file mappings); on shared mappings the data stays in the
// backing and is faulted back in on the next access. The kernel refuses
// locked pages: a locked range gives ErrLocked, so Unlock it first.
func (m *Mapping) DropPageCache(off, n int64) error {
	defer m.runlock(m.rlock())
	const op = "DropPageCache"
	if err := m.checkPages(op, off, n, true); err != nil {
		return err
	}
	err := m.madvise(op, off, n, unix.MADV_DONTNEED)
	if errors.Is(err, unix.EINVAL) {
		if st, serr := m.statsRange(off, n); serr == nil && st.AnyFlag("lo") {
			return &OpError{Op: op, Offset: off, Length: n, Err: fmt.Errorf(
				"%w (mlock'd pages cannot be dropped; call Unlock first): %w", ErrLocked, errors.Unwrap(err))}
		}
	}
	return err
}

// RemoveRange frees the backing of the range (MADV_REMOVE, a hole punched in
// the shared memory or file): crosvm's remove_range. Later reads return
// zeros and the backing's blocks are released. It needs a shared mapping; on
// a private one it returns ErrNotShared (use DropPageCache there).
func (m *Mapping) RemoveRange(off, n int64) error {
	defer m.runlock(m.rlock())
	const op = "RemoveRange"
	if err := m.checkPages(op, off, n, true); err != nil {
		return err
	}
	for _, e := range m.ents.within(off, n) {
		if !e.shared {
			return &RangeError{Op: op, Offset: off, Length: n, Limit: m.size, Err: ErrNotShared}
		}
	}
	return m.madvise(op, off, n, unix.MADV_REMOVE)
}

// UseHugepages asks for transparent hugepages over the range
// (MADV_HUGEPAGE): crosvm's use_hugepages. Whether they are used depends on
// /sys/kernel/mm/transparent_hugepage (anonymous memory) and its
// shmem_enabled (shared anonymous memory and memfds).
func (m *Mapping) UseHugepages(off, n int64) error {
	return m.advise("UseHugepages", off, n, unix.MADV_HUGEPAGE)
}

// NoHugepages forbids transparent hugepages over the range (MADV_NOHUGEPAGE).
func (m *Mapping) NoHugepages(off, n int64) error {
	return m.advise("NoHugepages", off, n, unix.MADV_NOHUGEPAGE)
}

// UseDontfork keeps the range out of child processes (MADV_DONTFORK): crosvm's
// use_dontfork. A VMM that forks helpers must not copy-on-write guest RAM.
func (m *Mapping) UseDontfork(off, n int64) error {
	return m.advise("UseDontfork", off, n, unix.MADV_DONTFORK)
}

// Msync writes the range's dirty pages back to the file and waits (msync
// MS_SYNC): crosvm's msync.
func (m *Mapping) Msync(off, n int64) error {
	return m.rangeCall("Msync", "msync", off, n, func(a uintptr, n int64) syscall.Errno {
		return sysMsync(a, n, unix.MS_SYNC)
	})
}

// LockOnFault locks the range's resident pages in memory and every other page
// as it is faulted in (mlock2 with MLOCK_ONFAULT): crosvm's lock_on_fault.
// Without CAP_IPC_LOCK the process's RLIMIT_MEMLOCK caps what can be locked;
// running into it is an error that says the limit and what was asked for.
func (m *Mapping) LockOnFault(off, n int64) error {
	err := m.rangeCall("LockOnFault", "mlock2(MLOCK_ONFAULT)", off, n, func(a uintptr, n int64) syscall.Errno {
		return sysMlock2(a, n, unix.MLOCK_ONFAULT)
	})
	var lim unix.Rlimit
	if (errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EPERM)) &&
		unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim) == nil {
		return fmt.Errorf("%w (asked to lock %d bytes; RLIMIT_MEMLOCK is %d bytes, counting what the process already locks; raise it with ulimit -l or grant CAP_IPC_LOCK)",
			err, n, lim.Cur)
	}
	return err
}

// Unlock unlocks the range (munlock): crosvm's unlock. Unlocking pages that
// are not locked is not an error.
func (m *Mapping) Unlock(off, n int64) error {
	return m.rangeCall("Unlock", "munlock", off, n, sysMunlock)
}

// Protect changes the protection of the range (mprotect). In an Arena the
// range must be mapped; reserved ranges keep the reservation's protection.
func (m *Mapping) Protect(off, n int64, p Protection) error {
	const op = "Protect"
	if err := m.lock(op); err != nil {
		return err
	}
	defer m.mu.Unlock()
	if !p.valid() {
		return fmt.Errorf("arena: %s: protection %#x: %w", op, int(p), ErrBadProtection)
	}
	if err := m.checkPages(op, off, n, true); err != nil {
		return err
	}
	if errno := sysMprotect(m.addr+uintptr(off), n, p); errno != 0 {
		return &OpError{Op: op, Offset: off, Length: n, Err: syscallErr("mprotect", errno)}
	}
	m.ents.protect(off, n, p)
	return nil
}

// PopulateMode says how Populate faults pages in.
type PopulateMode int

const (
	// PopulateWrite faults pages in writable (MADV_POPULATE_WRITE): anonymous
	// and shared memory gets its pages allocated, private file mappings
	// their copy-on-write copies. This is what prefaulting guest RAM wants.
	PopulateWrite PopulateMode = iota
	// PopulateRead faults pages in readable (MADV_POPULATE_READ): file pages
	// are read into the page cache and mapped, nothing is written.
	PopulateRead
)

// Populate faults the whole range in and maps it, so no later access takes a
// page fault (MADV_POPULATE_WRITE or MADV_POPULATE_READ, Linux 5.14). On older
// kernels it falls back, once per process with one log line, to touching one
// word of every page. Running out of memory (or of hugetlb pages) is an
// error here, never a SIGBUS later.
func (m *Mapping) Populate(off, n int64, mode PopulateMode) error {
	defer m.runlock(m.rlock())
	const op = "Populate"
	if mode != PopulateWrite && mode != PopulateRead {
		return fmt.Errorf("arena: %s: mode %d: %w", op, mode, ErrBadOption)
	}
	if err := m.checkPages(op, off, n, true); err != nil {
		return err
	}
	advice := unix.MADV_POPULATE_WRITE
	if mode == PopulateRead {
		advice = unix.MADV_POPULATE_READ
	}
	if populateSupported() {
		return m.madvise(op, off, n, advice)
	}
	return m.touchPages(op, off, n, mode == PopulateWrite)
}

// touchPages faults in every page of [off, off+n) by accessing one word of it.
// A write access is an atomic add of zero, which allocates the page without
// changing what a concurrent writer (a vCPU) stored there.
func (m *Mapping) touchPages(op string, off, n int64, write bool) error {
	step := m.granule
	for _, e := range m.ents.within(off, n) {
		step = max(step, e.pageSize)
	}
	for pos := off; pos < off+n; pos += step {
		addr := m.addr + uintptr(pos)
		if fa, faulted := catchFault(func() {
			if write {
				atomicAdd32(addr, 0)
			} else {
				atomicLoad32(addr)
			}
		}); faulted {
			return &FaultError{Op: op, Offset: pos, Addr: fa, Done: pos - off}
		}
	}
	return nil
}

var (
	populateOnce sync.Once
	populateOK   bool
)

// populateSupported reports whether the kernel has MADV_POPULATE_WRITE. It
// asks once, on a page of private anonymous memory: EINVAL means a kernel
// older than 5.14, and the touch fallback is used from then on.
func populateSupported() bool {
	populateOnce.Do(func() {
		addr, errno := sysMmap(0, pageSize, ProtReadWrite, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, -1, 0)
		if errno != 0 {
			return
		}
		defer func() { _ = sysMunmap(addr, pageSize) }() // a probe page: nothing to report
		e := sysMadvise(addr, pageSize, unix.MADV_POPULATE_WRITE)
		populateOK = e == 0
		if e == syscall.EINVAL {
			log.Printf("arena: MADV_POPULATE_WRITE unsupported (kernel before 5.14); populating by touching pages")
		}
	})
	return populateOK
}

// Resident reports, page by page, which pages of the range are resident in
// memory (mincore). Reserved arena ranges report false. The range must be
// page-aligned.
func (m *Mapping) Resident(off, n int64) ([]bool, error) {
	defer m.runlock(m.rlock())
	if err := m.checkPages("Resident", off, n, false); err != nil {
		return nil, err
	}
	vec := make([]byte, n/pageSize)
	if errno := sysMincore(m.addr+uintptr(off), n, vec); errno != 0 {
		return nil, fmt.Errorf("arena: Resident [%#x, +%#x): %w", off, n, syscallErr("mincore", errno))
	}
	res := make([]bool, len(vec))
	for i, v := range vec {
		res[i] = v&1 != 0
	}
	return res, nil
}

// ResidentBytes returns how many bytes of the range are resident (mincore).
func (m *Mapping) ResidentBytes(off, n int64) (int64, error) {
	res, err := m.Resident(off, n)
	if err != nil {
		return 0, err
	}
	var count int64
	for _, r := range res {
		if r {
			count += pageSize
		}
	}
	return count, nil
}
