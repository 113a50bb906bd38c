package arena

import (
	"errors"
	"fmt"
	"math"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/reentry"
)

// Mapping is a region of the process's address space mapped by this package
// and owned until Close: crosvm's MemoryMapping. A Mapping made by NewAnon or
// NewFromFD is mapped in full; an Arena (which embeds a Mapping) starts as a
// reservation and is filled piece by piece.
//
// All methods are safe for concurrent use. Accesses hold a read lock, so
// Close and the Arena methods that change what is mapped wait for accesses in
// flight, and no access ever touches memory being unmapped.
type Mapping struct {
	mu      sync.RWMutex
	addr    uintptr
	size    int64
	granule int64      // what offsets and sizes of range operations must be multiples of
	reserve Protection // protection of reserved (unmapped) ranges
	closed  bool
	ents    table
	// inCopy records the goroutines running a CopyFrom reader or CopyTo
	// writer with mu read-locked: their own accesses skip the read lock
	// (they hold it already, and a second RLock would wait behind a pending
	// Lock), and their calls that need mu locked fail with ErrReentered.
	inCopy reentry.Guard
}

// rlock read-locks mu unless the calling goroutine holds it already inside
// a copy's callback, and reports which; pass the result to runlock.
func (m *Mapping) rlock() bool {
	if _, ok := m.inCopy.Holding(); ok {
		return false
	}
	m.mu.RLock()
	return true
}

func (m *Mapping) runlock(locked bool) {
	if locked {
		m.mu.RUnlock()
	}
}

// lock write-locks mu for op, or fails with ErrReentered when called from a
// copy's callback on this mapping, which holds mu read-locked.
func (m *Mapping) lock(op string) error {
	if err := m.inCopy.Check(op); err != nil {
		return fmt.Errorf("arena: %w", err)
	}
	m.mu.Lock()
	return nil
}

// NewAnon maps size bytes of anonymous memory: crosvm's MemoryMapping::new and
// new_protection. The mapping is shared (MAP_SHARED|MAP_ANONYMOUS, backed by
// shmem, as in crosvm) unless Private is given, read-write unless
// WithProtection says otherwise, and MADV_DONTDUMP unless KeepInCoreDumps.
func NewAnon(size int64, opts ...Option) (*Mapping, error) {
	return newMapping("NewAnon", true, -1, 0, size, buildConfig(opts))
}

// NewFromFD maps size bytes of fd starting at fdOffset: crosvm's from_fd,
// from_fd_offset and from_fd_offset_protection(_populate). The kernel keeps
// its own reference to the file, so fd may be closed after the call. An fd
// that cannot back a mapping (negative, closed, O_PATH, a pipe, socket or
// directory, or opened with an access mode the mapping cannot have) is
// refused before anything is mapped, with an error wrapping ErrBadFD and the
// errno mmap would have returned (EBADF, ENODEV or EACCES).
func NewFromFD(fd int, fdOffset, size int64, opts ...Option) (*Mapping, error) {
	return newMapping("NewFromFD", false, fd, fdOffset, size, buildConfig(opts))
}

func newMapping(op string, anon bool, fd int, fdOff, size int64, c config) (*Mapping, error) {
	if c.replace {
		return nil, fmt.Errorf("arena: %s: Replace applies only to Arena.Add*: %w", op, ErrBadOption)
	}
	e, err := newEntry(op, 0, size, anon, fd, fdOff, c)
	if err != nil {
		return nil, err
	}
	align := e.pageSize
	if c.align != 0 {
		if !validAlign(c.align) {
			return nil, fmt.Errorf("arena: %s: alignment %#x: %w", op, c.align, ErrBadAlignment)
		}
		align = max(align, c.align)
	}
	addr, err := mapAligned(op, size, align, func(hint uintptr, fixed int) (uintptr, error) {
		return mmapEntry(hint, e, c, fixed)
	})
	if err != nil {
		return nil, err
	}
	m := &Mapping{addr: addr, size: size, granule: e.pageSize, ents: table{e}}
	if err := m.adviseNew(0, size, c); err != nil {
		return nil, errors.Join(err, sysMunmap(addr, size))
	}
	return m, nil
}

// newEntry validates a mapping request and describes it. anon says whether
// the request is for anonymous memory; it is never inferred from fd, so an
// fd-taking entry point handed a negative fd cannot end up mapping anonymous
// memory.
func newEntry(op string, off, size int64, anon bool, fd int, fdOff int64, c config) (entry, error) {
	e := entry{off: off, size: size, prot: c.prot, shared: !c.private, anon: anon,
		pageSize: pageSize, fd: fd, fdOff: fdOff}
	if !c.prot.valid() {
		return e, fmt.Errorf("arena: %s: protection %#x: %w", op, int(c.prot), ErrBadProtection)
	}
	if c.hugetlb != 0 {
		if !validAlign(c.hugetlb) || !e.anon {
			return e, fmt.Errorf("arena: %s: hugetlb page size %#x (anonymous mappings only; map a hugetlbfs or MFD_HUGETLB fd instead): %w",
				op, c.hugetlb, ErrBadOption)
		}
		e.pageSize = c.hugetlb
	}
	if !e.anon {
		st, err := checkFD(fd, e.shared, c.prot)
		if err != nil {
			return e, fmt.Errorf("arena: %s: fd %d: %w", op, fd, err)
		}
		e.dev, e.ino = st.Dev, st.Ino
		var fs unix.Statfs_t
		if unix.Fstatfs(fd, &fs) == nil && fs.Type == unix.HUGETLBFS_MAGIC {
			e.pageSize = int64(st.Blksize)
		}
	} else {
		e.fd, e.fdOff = -1, 0
	}
	if err := checkNewRange(op, off, size, fdOff, e.pageSize); err != nil {
		return e, err
	}
	return e, nil
}

// checkFD refuses, before mmap is tried, an fd that cannot give the mapping
// asked for, and returns its fstat. Each refusal wraps ErrBadFD and the errno
// mmap would have answered: EBADF for a negative, closed or O_PATH fd, ENODEV
// for a pipe, socket or directory, and EACCES for an open mode that does not
// allow the mapping (every mapping needs read access, and a shared writable
// one needs the fd open for writing too).
func checkFD(fd int, shared bool, prot Protection) (unix.Stat_t, error) {
	var st unix.Stat_t
	if fd < 0 {
		return st, fmt.Errorf("%w: a negative fd is never open: %w", ErrBadFD, unix.EBADF)
	}
	if err := unix.Fstat(fd, &st); err != nil {
		return st, fmt.Errorf("%w: %w", ErrBadFD, os.NewSyscallError("fstat", err))
	}
	kind := ""
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFIFO:
		kind = "pipe"
	case unix.S_IFSOCK:
		kind = "socket"
	case unix.S_IFDIR:
		kind = "directory"
	}
	if kind != "" {
		return st, fmt.Errorf("%w: a %s cannot be memory-mapped: %w", ErrBadFD, kind, unix.ENODEV)
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return st, fmt.Errorf("%w: %w", ErrBadFD, os.NewSyscallError("fcntl", err))
	}
	switch mode := fl & unix.O_ACCMODE; {
	case fl&unix.O_PATH != 0:
		return st, fmt.Errorf("%w: opened with O_PATH, which cannot be memory-mapped: %w", ErrBadFD, unix.EBADF)
	case mode == unix.O_WRONLY:
		return st, fmt.Errorf("%w: open write-only; mapping needs read access: %w", ErrBadFD, unix.EACCES)
	case mode == unix.O_RDONLY && shared && prot&ProtWrite != 0:
		return st, fmt.Errorf("%w: open read-only; a shared writable mapping needs O_RDWR: %w", ErrBadFD, unix.EACCES)
	}
	return st, nil
}

func checkNewRange(op string, off, size, fdOff, granule int64) error {
	re := func(err error) error {
		return &RangeError{Op: op, Offset: off, Length: size, Limit: math.MaxInt64, Err: err}
	}
	switch {
	case size == 0:
		return re(ErrZeroSize)
	case size < 0 || off < 0 || fdOff < 0:
		return re(ErrOutOfRange)
	case off > math.MaxInt64-size || fdOff > math.MaxInt64-size:
		return re(ErrOverflow)
	case off%granule != 0 || size%granule != 0 || fdOff%granule != 0:
		return re(fmt.Errorf("%w (page size %#x, file offset %#x)", ErrUnaligned, granule, fdOff))
	}
	return nil
}

// mmapEntry maps e at addr; flags adds MAP_FIXED or MAP_FIXED_NOREPLACE.
func mmapEntry(addr uintptr, e entry, c config, fixed int) (uintptr, error) {
	flags := fixed
	if e.shared {
		flags |= unix.MAP_SHARED
	} else {
		flags |= unix.MAP_PRIVATE
	}
	fd := e.fd
	if e.anon {
		flags |= unix.MAP_ANONYMOUS
		fd = -1
	}
	if c.hugetlb != 0 {
		flags |= hugeFlags(c.hugetlb)
	}
	if c.noReserve {
		flags |= unix.MAP_NORESERVE
	}
	if c.populate {
		flags |= unix.MAP_POPULATE
	}
	r, errno := sysMmap(addr, e.size, e.prot, flags, fd, e.fdOff)
	if errno != 0 {
		return 0, syscallErr("mmap", errno)
	}
	return r, nil
}

// reserveFlags are the flags of address space that is held but not usable.
const reserveFlags = unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_NORESERVE

// mapAligned places a size-byte mapping at an address aligned to align. When
// align exceeds a page it reserves size+align bytes, maps inside them with
// MAP_FIXED, and unmaps the slack; any failure releases everything it mapped.
func mapAligned(op string, size, align int64, mapAt func(hint uintptr, fixed int) (uintptr, error)) (uintptr, error) {
	if align <= pageSize {
		addr, err := mapAt(0, 0)
		if err != nil {
			return 0, fmt.Errorf("arena: %s: %w", op, err)
		}
		return addr, nil
	}
	if size > math.MaxInt64-align {
		return 0, &RangeError{Op: op, Length: size, Limit: math.MaxInt64, Err: ErrOverflow}
	}
	resv, errno := sysMmap(0, size+align, ProtNone, reserveFlags, -1, 0)
	if errno != 0 {
		return 0, fmt.Errorf("arena: %s: reserving %#x bytes: %w", op, size+align, syscallErr("mmap", errno))
	}
	addr := (resv + uintptr(align) - 1) &^ (uintptr(align) - 1)
	// MAP_FIXED here replaces part of the reservation just made above.
	if _, err := mapAt(addr, unix.MAP_FIXED); err != nil {
		return 0, errors.Join(fmt.Errorf("arena: %s: %w", op, err), sysMunmap(resv, size+align))
	}
	var errs []error
	if head := int64(addr - resv); head > 0 {
		errs = append(errs, sysMunmap(resv, head))
	}
	if tail := int64(resv) + size + align - (int64(addr) + size); tail > 0 {
		errs = append(errs, sysMunmap(addr+uintptr(size), tail))
	}
	if err := errors.Join(errs...); err != nil {
		return 0, errors.Join(fmt.Errorf("arena: %s: trimming alignment slack: %w", op, err), sysMunmap(resv, size+align))
	}
	return addr, nil
}

// adviseNew applies the defaults every new mapping gets.
func (m *Mapping) adviseNew(off, size int64, c config) error {
	if c.keepDump {
		return nil
	}
	if errno := sysMadvise(m.addr+uintptr(off), size, unix.MADV_DONTDUMP); errno != 0 {
		return fmt.Errorf("arena: %w", syscallErr(adviceName(unix.MADV_DONTDUMP), errno))
	}
	return nil
}

// Addr returns the address of the first byte of the mapping. It is meant for
// handing the memory to the kernel (KVM_SET_USER_MEMORY_REGION), not for
// dereferencing.
func (m *Mapping) Addr() uintptr { return m.addr }

// Size returns the size of the mapping in bytes.
func (m *Mapping) Size() int64 { return m.size }

// Close unmaps the whole mapping (for an Arena, the whole reservation and
// everything mapped in it). It waits for accesses in flight. Calling Close
// again returns nil; every other method returns ErrClosed afterwards.
func (m *Mapping) Close() error {
	if err := m.lock("Close"); err != nil {
		return err
	}
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	if err := sysMunmap(m.addr, m.size); err != nil {
		return fmt.Errorf("arena: closing mapping at %#x: %w", m.addr, err)
	}
	m.closed = true
	m.ents = nil
	return nil
}

// checkRange validates [off, off+n) against the mapping's size.
func (m *Mapping) checkRange(op string, off, n int64) error {
	re := func(err error) error { return &RangeError{Op: op, Offset: off, Length: n, Limit: m.size, Err: err} }
	switch {
	case m.closed:
		return fmt.Errorf("arena: %s: the mapping is closed: %w", op, ErrClosed)
	case n == 0:
		return re(ErrZeroSize)
	case off < 0 || n < 0:
		return re(ErrOutOfRange)
	case off > math.MaxInt64-n:
		return re(ErrOverflow)
	case off+n > m.size:
		return re(ErrOutOfRange)
	}
	return nil
}

// checkPages validates a page-granular range for a memory-management call:
// in bounds, aligned to the page size of everything it covers, and (when
// mapped is set) covered by mappings.
func (m *Mapping) checkPages(op string, off, n int64, mapped bool) error {
	if err := m.checkRange(op, off, n); err != nil {
		return err
	}
	granule := m.granule
	for _, e := range m.ents.within(off, n) {
		granule = max(granule, e.pageSize)
	}
	if off%granule != 0 || n%granule != 0 {
		return &RangeError{Op: op, Offset: off, Length: n, Limit: m.size,
			Err: fmt.Errorf("%w (page size %#x)", ErrUnaligned, granule)}
	}
	if mapped && !m.ents.covers(off, n) {
		return &RangeError{Op: op, Offset: off, Length: n, Limit: m.size, Err: ErrNotMapped}
	}
	return nil
}
