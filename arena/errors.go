package arena

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/reentry"
)

// Sentinel errors. Every error returned by this package wraps at least one of
// them (or an *os.SyscallError carrying the failing syscall's errno), so
// callers can branch with errors.Is.
var (
	// ErrClosed is wrapped by the error of every call on a Mapping or Arena
	// after Close. It is fs.ErrClosed, as for an *os.File, so one test
	// serves every package: errors.Is(err, fs.ErrClosed).
	ErrClosed = fs.ErrClosed
	// ErrZeroSize is returned for a zero-length size or range.
	ErrZeroSize = errors.New("zero size")
	// ErrUnaligned is returned when an offset, size or file offset is not a
	// multiple of the page size (or of the hugetlb page size for hugetlb
	// mappings), or an atomic access is not naturally aligned.
	ErrUnaligned = errors.New("unaligned offset or size")
	// ErrBadAlignment is returned for a requested address alignment that is
	// not a power of two of at least one page.
	ErrBadAlignment = errors.New("alignment must be a power of two of at least one page")
	// ErrOverflow is returned when offset+size overflows.
	ErrOverflow = errors.New("offset plus size overflows")
	// ErrOutOfRange is returned when a range is negative or extends past the
	// end of the mapping or arena.
	ErrOutOfRange = errors.New("range outside the mapping")
	// ErrOverlap is returned when a new mapping would overlap an existing one
	// and the caller did not ask to replace it.
	ErrOverlap = errors.New("range overlaps an existing mapping")
	// ErrNotMapped is returned when a range that must be mapped covers
	// reserved (unmapped) arena memory.
	ErrNotMapped = errors.New("range is not mapped")
	// ErrBadFD is returned for a file descriptor that is negative, closed,
	// O_PATH, refers to something that cannot be memory-mapped (a pipe,
	// socket or directory), or was opened with an access mode the mapping
	// cannot have. Such fds are refused before anything is mapped, and the
	// error also wraps the errno mmap would have returned.
	ErrBadFD = errors.New("bad file descriptor")
	// ErrBadProtection is returned for protection bits other than
	// ProtRead, ProtWrite and ProtExec.
	ErrBadProtection = errors.New("unknown protection bits")
	// ErrFault is wrapped by every error caused by a memory access that the
	// hardware refused: a reserved range, a PROT_NONE page, a page of a shared
	// file mapping past the end of a truncated file (SIGBUS), or an EFAULT
	// from the kernel while it copied into or out of the mapping.
	ErrFault = errors.New("memory fault")
	// ErrLocked is returned when an operation that cannot apply to locked
	// pages (DropPageCache, MADV_DONTNEED) meets a range locked by mlock.
	ErrLocked = errors.New("range is locked")
	// ErrNotShared is returned by operations that need a shared mapping
	// (RemoveRange punches a hole in the shared backing) on a private one.
	ErrNotShared = errors.New("operation needs a shared mapping")
	// ErrBadOption is returned when an option does not apply to the call it
	// was given to, or has an invalid value.
	ErrBadOption = errors.New("option does not apply")
)

// ErrReentered is wrapped by the error of a call made from the reader or
// writer of CopyFrom or CopyTo that would wait for that copy to end —
// Close, Protect, AddFDMapping, AddAnonMapping, RemoveMapping on the same
// mapping — instead of a deadlock. Call it after the copy returns.
var ErrReentered = reentry.ErrReentered

// OpError reports a system call that failed on a range of a mapping: the
// method, the range, and the cause (an *os.SyscallError, possibly wrapped
// with a sentinel such as ErrLocked), or the error of the reader or writer
// of CopyFrom and CopyTo at the offset where it stopped.
type OpError struct {
	Op     string // the method, e.g. "DropPageCache"
	Offset int64  // the offset of the range
	Length int64  // its length
	Err    error  // the cause
}

func (e *OpError) Error() string {
	return fmt.Sprintf("arena: %s [%#x, +%#x): %v", e.Op, e.Offset, e.Length, e.Err)
}

// Unwrap returns the cause.
func (e *OpError) Unwrap() error { return e.Err }

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
