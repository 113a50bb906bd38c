// Package arena owns memory mappings for a virtual machine monitor: a Go
// counterpart of crosvm's MemoryMapping and MemoryMappingArena.
//
// A Mapping is one mmap'd region, owned until Close, with the operations a
// VMM applies to guest RAM (Prefetch, Populate, DropPageCache, RemoveRange,
// LockOnFault, Unlock, UseHugepages, UseDontfork, Msync, Protect) and
// bounds-checked access (io.ReaderAt, io.WriterAt, little-endian values,
// atomics for shared-memory protocols with a guest).
//
// An Arena reserves a large range of address space PROT_NONE and is filled
// with AddFDMapping and AddAnonMapping at fixed, page-aligned offsets;
// RemoveMapping returns ranges to the reservation. MAP_FIXED is only ever
// issued inside the arena's own reservation, and a removed range is never a
// hole that another mmap in the process could take.
//
// Accesses never crash the process: a reserved range is rejected before it is
// touched, and a fault the hardware raises anyway (a PROT_NONE page, a shared
// file truncated under the mapping) is caught with runtime/debug's
// SetPanicOnFault and returned as a *FaultError wrapping ErrFault, with the
// exact number of bytes moved before it. This holds under the race detector
// too: the atomics are written in assembly, because sync/atomic runs inside
// the detector's C runtime there, where a fault cannot be recovered.
//
// Every error wraps a sentinel (ErrZeroSize, ErrUnaligned, ErrOverflow,
// ErrOutOfRange, ErrOverlap, ErrNotMapped, ErrBadFD, ErrBadProtection,
// ErrClosed, ErrFault, ErrLocked, ErrNotShared, ErrBadOption,
// ErrBadAlignment) or an *os.SyscallError naming the failing call; use
// errors.Is and errors.As.
//
// Mapping and Arena are safe for concurrent use.
package arena
