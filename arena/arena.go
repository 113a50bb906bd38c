package arena

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Arena is one reserved range of address space that mappings are placed into
// at fixed offsets: crosvm's MemoryMappingArena, with the reach of Fuchsia's
// Vmar. New reserves the range PROT_NONE (or read-only); AddFDMapping and
// AddAnonMapping map into it with MAP_FIXED, RemoveMapping returns ranges to
// the reservation. The address space stays owned by the Arena from New to
// Close, so MAP_FIXED never lands on memory anyone else owns, and a removed
// range is never a hole another mmap could take.
//
// Every Mapping method (access, Prefetch, Populate, Protect, ...) works on
// arena ranges too; ranges it needs mapped must be covered by mappings.
// Arena is safe for concurrent use: accesses to one range may run while
// other ranges are added or removed.
type Arena struct {
	*mapping // unexported, so no caller can swap it; its methods are Arena's
}

// mapping names Mapping as Arena's embedded field.
type mapping = Mapping

// ArenaOption configures New.
type ArenaOption func(*arenaConfig)

type arenaConfig struct {
	align   int64
	reserve Protection
}

// DefaultArenaAlign is the alignment of an arena's base unless ArenaAlign
// says otherwise: 2 MiB, so transparent and hugetlb hugepages can back
// mappings placed at 2 MiB-aligned offsets.
const DefaultArenaAlign = 2 << 20

// ArenaAlign sets the alignment of the arena's base address, a power of two
// of at least one page (1 GiB for 1 GiB hugetlb pages).
func ArenaAlign(align int64) ArenaOption { return func(c *arenaConfig) { c.align = align } }

// ReadOnlyReservation reserves the arena PROT_READ instead of PROT_NONE, as
// crosvm does when a whole arena is registered as one KVM memory slot for
// device shared memory: a guest touching an unfilled or removed range then
// reads zeros instead of making KVM_RUN fail with EFAULT.
func ReadOnlyReservation() ArenaOption { return func(c *arenaConfig) { c.reserve = ProtRead } }

// New reserves size bytes of address space (a multiple of the page size):
// private, anonymous, MAP_NORESERVE and PROT_NONE, so reserving even a
// terabyte costs neither memory nor commit charge.
func New(size int64, opts ...ArenaOption) (*Arena, error) {
	c := arenaConfig{align: DefaultArenaAlign, reserve: ProtNone}
	for _, o := range opts {
		o(&c)
	}
	if !validAlign(c.align) {
		return nil, fmt.Errorf("arena: New: alignment %#x: %w", c.align, ErrBadAlignment)
	}
	if err := checkNewRange("New", 0, size, 0, pageSize); err != nil {
		return nil, err
	}
	addr, err := mapAligned("New", size, c.align, func(hint uintptr, fixed int) (uintptr, error) {
		r, errno := sysMmap(hint, size, c.reserve, reserveFlags|fixed, -1, 0)
		if errno != 0 {
			return 0, fmt.Errorf("reserving %#x bytes: %w", size, syscallErr("mmap", errno))
		}
		return r, nil
	})
	if err != nil {
		return nil, err
	}
	m := &Mapping{addr: addr, size: size, granule: pageSize, reserve: c.reserve}
	if err := m.adviseNew(0, size, config{}); err != nil {
		return nil, errors.Join(err, sysMunmap(addr, size))
	}
	return &Arena{mapping: m}, nil
}

// FromMapping turns m into an Arena whose whole range is one mapping, as
// crosvm's From<MemoryMapping> for MemoryMappingArena: ranges removed from it
// become PROT_NONE reservation. m must not be used on its own afterwards
// except through the returned Arena (they are the same object).
func FromMapping(m *Mapping) *Arena { return &Arena{mapping: m} }

// ReservationProtection is the protection of the arena's unmapped ranges.
func (a *Arena) ReservationProtection() Protection { return a.reserve }

// AddFDMapping maps size bytes of fd, starting at fdOffset, at offset in the
// arena with protection prot (crosvm's add_fd_mapping). The mapping is
// MAP_SHARED unless Private is given; Populate, NoReserve, KeepInCoreDumps and
// Replace apply. offset, size and fdOffset must be page-aligned (aligned to
// the huge page size for hugetlbfs and MFD_HUGETLB files). The kernel keeps
// its own reference to the file, so fd may be closed afterwards. An fd that
// cannot back a mapping is refused as by NewFromFD, before the arena is
// touched: an error wrapping ErrBadFD and the errno mmap would have returned.
func (a *Arena) AddFDMapping(offset, size int64, fd int, fdOffset int64, prot Protection, opts ...Option) error {
	return a.add("AddFDMapping", offset, size, false, fd, fdOffset, prot, opts)
}

// AddAnonMapping maps size bytes of fresh anonymous memory at offset in the
// arena with protection prot. The memory is shared (shmem-backed, so
// RemoveRange can free it) unless Private is given; Hugetlb, PopulateOnMap,
// NoReserve, KeepInCoreDumps and Replace apply.
func (a *Arena) AddAnonMapping(offset, size int64, prot Protection, opts ...Option) error {
	return a.add("AddAnonMapping", offset, size, true, -1, 0, prot, opts)
}

func (a *Arena) add(op string, off, size int64, anon bool, fd int, fdOff int64, prot Protection, opts []Option) error {
	c := buildConfig(opts)
	if c.protSet || c.align != 0 {
		return fmt.Errorf("arena: %s: WithProtection and Align do not apply (protection is an argument, the offset fixes the address): %w",
			op, ErrBadOption)
	}
	c.prot = prot
	e, err := newEntry(op, off, size, anon, fd, fdOff, c)
	if err != nil {
		return err
	}
	if err := a.lock(op); err != nil {
		return err
	}
	defer a.mu.Unlock()
	if err := a.checkRange(op, off, size); err != nil {
		return err
	}
	if uint64(a.addr+uintptr(off))%uint64(e.pageSize) != 0 {
		return &RangeError{Op: op, Offset: off, Length: size, Limit: a.size,
			Err: fmt.Errorf("%w: address not aligned to page size %#x (see ArenaAlign)", ErrUnaligned, e.pageSize)}
	}
	if !c.replace && a.ents.overlaps(off, size) {
		return &RangeError{Op: op, Offset: off, Length: size, Limit: a.size, Err: ErrOverlap}
	}
	if _, err := mmapEntry(a.fixedAddr(off, size), e, c, unix.MAP_FIXED); err != nil {
		// A failed MAP_FIXED may have unmapped what was there: put the
		// reservation back so the range is never a hole, then report.
		rerr := a.reserveRange(off, size)
		if rerr == nil {
			a.ents.cut(off, size)
		}
		return errors.Join(&OpError{Op: op, Offset: off, Length: size, Err: err}, rerr)
	}
	a.ents.cut(off, size)
	a.ents.insert(e)
	return a.adviseNew(off, size, c)
}

// RemoveMapping returns [offset, offset+size) to the reservation (crosvm's
// remove_mapping): the range is mapped over, atomically, with fresh
// reservation memory of the arena's reservation protection, so its pages are
// released and the address space is never left unowned. The range must be
// mapped; it may cover part of a mapping, which is then split, or several
// adjacent mappings.
func (a *Arena) RemoveMapping(offset, size int64) error {
	const op = "RemoveMapping"
	if err := a.lock(op); err != nil {
		return err
	}
	defer a.mu.Unlock()
	if err := a.checkPages(op, offset, size, true); err != nil {
		return err
	}
	if err := a.reserveRange(offset, size); err != nil {
		return &OpError{Op: op, Offset: offset, Length: size, Err: err}
	}
	a.ents.cut(offset, size)
	return nil
}

// reserveRange maps reservation memory over [off, off+size).
func (a *Arena) reserveRange(off, size int64) error {
	if _, errno := sysMmap(a.fixedAddr(off, size), size, a.reserve, reserveFlags|unix.MAP_FIXED, -1, 0); errno != 0 {
		return syscallErr("mmap", errno)
	}
	// Keep the reservation one VMA: its neighbours are MADV_DONTDUMP too.
	if errno := sysMadvise(a.addr+uintptr(off), size, unix.MADV_DONTDUMP); errno != 0 {
		return syscallErr(adviceName(unix.MADV_DONTDUMP), errno)
	}
	return nil
}

// fixedAddr is the one place that computes an address for MAP_FIXED. Callers
// have validated the range; the check here guards the invariant that MAP_FIXED
// only ever replaces memory inside the arena's own reservation.
func (a *Arena) fixedAddr(off, size int64) uintptr {
	if a.closed || off < 0 || size <= 0 || off > a.size-size {
		panic(fmt.Sprintf("arena: internal error: MAP_FIXED range [%#x, +%#x) outside %#x-byte arena", off, size, a.size))
	}
	return a.addr + uintptr(off)
}

// MappingInfo describes one mapping in an arena, as Fuchsia's info_maps does.
type MappingInfo struct {
	Offset    int64      // offset in the arena
	Size      int64      // bytes mapped
	Prot      Protection // current protection
	Shared    bool       // MAP_SHARED (false: MAP_PRIVATE)
	Anonymous bool       // anonymous memory (false: a file)
	PageSize  int64      // page size of the backing (hugetlb page size for hugetlb memory)
	FD        int        // the fd given when mapped (it may since have been closed); -1 if anonymous
	FDOffset  int64      // offset in the file of the first byte
	Dev, Ino  uint64     // device and inode of the file, from fstat when mapped
}

// Mappings lists what is mapped, lowest offset first. A mapping that was
// partly removed or partly re-protected is listed as its pieces.
func (m *Mapping) Mappings() []MappingInfo {
	defer m.runlock(m.rlock())
	out := make([]MappingInfo, len(m.ents))
	for i, e := range m.ents {
		out[i] = MappingInfo{Offset: e.off, Size: e.size, Prot: e.prot, Shared: e.shared, Anonymous: e.anon,
			PageSize: e.pageSize, FD: e.fd, FDOffset: e.fdOff, Dev: e.dev, Ino: e.ino}
	}
	return out
}
