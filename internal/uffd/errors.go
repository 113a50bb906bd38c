//go:build linux

package uffd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Sentinel errors. Errors from this package also answer errors.Is for the
// standard sentinels where they mean the same: fs.ErrClosed after Close,
// errors.ErrUnsupported for a feature the kernel lacks, fs.ErrPermission when
// no userfaultfd may be made, fs.ErrInvalid for a bad argument, fs.ErrExist
// for a page already present, and the errno of a failed ioctl.
var (
	// ErrPresent: the page is already present (EEXIST from UFFDIO_COPY,
	// UFFDIO_ZEROPAGE or UFFDIO_POISON). Another server, the kernel's own
	// fault path (a shared page cache), or an earlier Copy filled it; for a
	// caller that wants the page present this is success. The faulting
	// threads have been woken unless DontWake was given.
	ErrPresent = errors.New("page already present")
	// ErrAgain: the address space is changing (EAGAIN): a Remove or Unmap
	// event is queued or its madvise/munmap has not finished. Nothing more
	// was done than the count returned says. Read the queued events, then
	// retry; Serve does both.
	ErrAgain = errors.New("address space changing, read events and retry")
	// ErrUnmapped: the destination is no longer registered with this
	// userfaultfd or no longer mapped (ENOENT). A thread waiting there was
	// woken by the unregister or sees SIGSEGV.
	ErrUnmapped = errors.New("range no longer registered or mapped")
	// ErrExited: the process that owns the registered memory has exited
	// (ESRCH).
	ErrExited = errors.New("process of the registered memory has exited")
	// ErrRegistered: ranges were still registered when Close released the
	// userfaultfd; their pages never served now come from the kernel's normal
	// fault path (see Close).
	ErrRegistered = errors.New("range registered")
)

// OpError reports a userfaultfd ioctl that failed on a range: which
// operation, the range, how many bytes it had done, and why (an
// *os.SyscallError carrying the errno). errors.Is matches it against the
// sentinel the errno means (ErrPresent, ErrAgain, ErrUnmapped, ErrExited),
// against fs.ErrClosed after Close, and against the errno itself.
type OpError struct {
	Op   string  // "Copy", "ZeroPage", "Poison", "Wake", "Register", "Unregister"
	Addr uintptr // start of the range
	Len  uintptr // its length
	Done int     // bytes done before the failure (Copy, ZeroPage, Poison)
	Err  error
}

func (e *OpError) Error() string {
	s := fmt.Sprintf("uffd: %s [%#x, +%#x)", e.Op, e.Addr, e.Len)
	if e.Done > 0 {
		s += fmt.Sprintf(" after %#x bytes", e.Done)
	}
	if sent := e.sentinel(); sent != nil {
		return s + ": " + sent.Error() + " (" + e.Err.Error() + ")"
	}
	return s + ": " + e.Err.Error()
}

func (e *OpError) Unwrap() error { return e.Err }

// Is maps the errno onto this package's sentinel for it.
func (e *OpError) Is(target error) bool {
	s := e.sentinel()
	return s != nil && s == target
}

func (e *OpError) sentinel() error {
	var errno syscall.Errno
	if !errors.As(e.Err, &errno) {
		return nil
	}
	switch errno {
	case unix.EEXIST:
		return ErrPresent
	case unix.EAGAIN:
		return ErrAgain
	case unix.ENOENT:
		return ErrUnmapped
	case unix.ESRCH:
		return ErrExited
	}
	return nil
}

// opError builds the error of a failed ioctl, or nil.
func opError(op, ioctl string, addr, n uintptr, done int, errno syscall.Errno) error {
	return &OpError{Op: op, Addr: addr, Len: n, Done: done, Err: os.NewSyscallError("ioctl "+ioctl, errno)}
}

// closedError is the error of any call after Close.
func closedError(op string) error {
	return fmt.Errorf("uffd: %s: %w", op, fs.ErrClosed)
}

// invalid is the error of a bad argument.
func invalid(op, format string, args ...any) error {
	return fmt.Errorf("uffd: %s: %s: %w", op, fmt.Sprintf(format, args...), fs.ErrInvalid)
}
