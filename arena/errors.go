package arena

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Sentinel errors. Every error returned by this package wraps at least one of
// them (or an *os.SyscallError carrying the failing syscall's errno), so
// callers can branch with errors.Is.
var (
	// ErrClosed is returned by every call on a Mapping or Arena after Close.
	ErrClosed = errors.New("arena: use of closed mapping")
	// ErrZeroSize is returned for a zero-length size or range.
	ErrZeroSize = errors.New("arena: zero size")
	// ErrUnaligned is returned when an offset, size or file offset is not a
	// multiple of the page size (or of the hugetlb page size for hugetlb
	// mappings), or an atomic access is not naturally aligned.
	ErrUnaligned = errors.New("arena: unaligned offset or size")
	// ErrBadAlignment is returned for a requested address alignment that is
	// not a power of two of at least one page.
	ErrBadAlignment = errors.New("arena: alignment must be a power of two of at least one page")
	// ErrOverflow is returned when offset+size overflows.
	ErrOverflow = errors.New("arena: offset plus size overflows")
	// ErrOutOfRange is returned when a range is negative or extends past the
	// end of the mapping or arena.
	ErrOutOfRange = errors.New("arena: range outside the mapping")
	// ErrOverlap is returned when a new mapping would overlap an existing one
	// and the caller did not ask to replace it.
	ErrOverlap = errors.New("arena: range overlaps an existing mapping")
	// ErrNotMapped is returned when a range that must be mapped covers
	// reserved (unmapped) arena memory.
	ErrNotMapped = errors.New("arena: range is not mapped")
	// ErrBadFD is returned for a file descriptor that is negative, closed,
	// O_PATH, refers to something that cannot be memory-mapped (a pipe,
	// socket or directory), or was opened with an access mode the mapping
	// cannot have. Such fds are refused before anything is mapped, and the
	// error also wraps the errno mmap would have returned.
	ErrBadFD = errors.New("arena: bad file descriptor")
	// ErrBadProtection is returned for protection bits other than
	// ProtRead, ProtWrite and ProtExec.
	ErrBadProtection = errors.New("arena: unknown protection bits")
	// ErrFault is wrapped by every error caused by a memory access that the
	// hardware refused: a reserved range, a PROT_NONE page, a page of a shared
	// file mapping past the end of a truncated file (SIGBUS), or an EFAULT
	// from the kernel while it copied into or out of the mapping.
	ErrFault = errors.New("arena: memory fault")
	// ErrLocked is returned when an operation that cannot apply to locked
	// pages (DropPageCache, MADV_DONTNEED) meets a range locked by mlock.
	ErrLocked = errors.New("arena: range is locked")
	// ErrNotShared is returned by operations that need a shared mapping
	// (RemoveRange punches a hole in the shared backing) on a private one.
	ErrNotShared = errors.New("arena: operation needs a shared mapping")
	// ErrBadOption is returned when an option does not apply to the call it
	// was given to, or has an invalid value.
	ErrBadOption = errors.New("arena: option does not apply")
)

// RangeError describes a rejected (offset, length) argument. It wraps one of
// the sentinel errors above.
type RangeError struct {
	Op     string // the method that rejected the range, e.g. "Prefetch"
	Offset int64  // the offset given
	Length int64  // the length given
	Limit  int64  // the size of the mapping or arena
	Err    error  // the sentinel: ErrZeroSize, ErrUnaligned, ErrOverflow, ...
}

func (e *RangeError) Error() string {
	return fmt.Sprintf("arena: %s [%#x, +%#x) in %#x-byte mapping: %v",
		e.Op, e.Offset, e.Length, e.Limit, e.Err)
}

// Unwrap returns the sentinel error.
func (e *RangeError) Unwrap() error { return e.Err }

// FaultError reports a memory access that faulted. It always satisfies
// errors.Is(err, ErrFault); Err, when set, says more (ErrNotMapped for a
// reserved arena range, or the errno the kernel returned).
type FaultError struct {
	Op     string  // the method whose access faulted
	Offset int64   // offset within the mapping of the faulting byte (or page)
	Addr   uintptr // the faulting virtual address
	Done   int64   // bytes transferred before the fault
	Err    error   // the underlying cause, if any
}

func (e *FaultError) Error() string {
	msg := fmt.Sprintf("arena: %s: memory fault at offset %#x (address %#x) after %d bytes",
		e.Op, e.Offset, e.Addr, e.Done)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

// Unwrap returns ErrFault and the underlying cause.
func (e *FaultError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrFault}
	}
	return []error{ErrFault, e.Err}
}

// syscallErr wraps errno with the syscall's name, as os does, and maps errnos
// that have a meaning in this package onto its sentinels.
func syscallErr(name string, errno syscall.Errno) error {
	err := os.NewSyscallError(name, errno)
	switch errno {
	case unix.EBADF, unix.ENODEV:
		return fmt.Errorf("%w: %w", ErrBadFD, err)
	case unix.EFAULT:
		return fmt.Errorf("%w: %w", ErrFault, err)
	}
	return err
}
