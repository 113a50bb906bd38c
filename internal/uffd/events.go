//go:build linux

package uffd

import (
	"context"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Kind is the kind of an Event (the kernel's UFFD_EVENT_*).
type Kind uint8

const (
	// PageFault: a thread touched a missing page of a registered range and
	// waits until it is served (Copy, ZeroPage), failed (Poison) or woken.
	PageFault Kind = eventPagefault
	// Remove: MADV_DONTNEED or MADV_REMOVE is dropping [Start, End) of a
	// registered range (FeatureEventRemove). The range stays registered: its
	// pages fault again, and should then be served as zeros, not as the
	// snapshot's data. The madvise waits until this event is read.
	Remove Kind = eventRemove
	// Unmap: munmap is unmapping [Start, End) (FeatureEventUnmap); the range
	// is no longer registered. The munmap waits until this event is read.
	Unmap Kind = eventUnmap
	// Fork and Remap are never asked for (Open refuses their features).
	Fork  Kind = eventFork
	Remap Kind = eventRemap
)

func (k Kind) String() string {
	switch k {
	case PageFault:
		return "PageFault"
	case Remove:
		return "Remove"
	case Unmap:
		return "Unmap"
	case Fork:
		return "Fork"
	case Remap:
		return "Remap"
	}
	return fmt.Sprintf("Kind(%#x)", uint8(k))
}

// FaultFlags describe a page fault (the kernel's UFFD_PAGEFAULT_FLAG_*).
type FaultFlags uint64

const (
	FaultWrite        FaultFlags = pagefaultFlagWrite // the access was a write
	FaultWriteProtect FaultFlags = pagefaultFlagWP    // a write-protect fault (never, in MISSING mode)
	FaultMinor        FaultFlags = pagefaultFlagMinor // a minor fault (never, in MISSING mode)
)

// Event is one message read from a userfaultfd.
type Event struct {
	Kind Kind

	// PageFault: the faulting address (exact with FeatureExactAddress,
	// otherwise rounded down to the base page), the page to serve — its
	// start and size, a huge page on hugetlb memory — the fault's flags, and
	// the faulting thread's id (with FeatureThreadID; 0 otherwise).
	Addr     uintptr
	Page     uintptr
	PageSize uintptr
	Flags    FaultFlags
	ThreadID int

	// Remove, Unmap: the range, [Start, End).
	Start, End uintptr

	seq uint64 // Remove, Unmap read by Serve: the event's number (see order)
}

// Write reports whether the fault was a write.
func (e Event) Write() bool { return e.Flags&FaultWrite != 0 }

func (e Event) String() string {
	switch e.Kind {
	case PageFault:
		rw := "read"
		if e.Write() {
			rw = "write"
		}
		s := fmt.Sprintf("PageFault %s at %#x (page %#x, %d bytes)", rw, e.Addr, e.Page, e.PageSize)
		if e.ThreadID != 0 {
			s += fmt.Sprintf(" by thread %d", e.ThreadID)
		}
		return s
	case Remove, Unmap:
		return fmt.Sprintf("%v [%#x, %#x)", e.Kind, e.Start, e.End)
	}
	return e.Kind.String()
}

// ReadEvents waits for events and reads as many as are queued, up to
// len(evs). It returns once at least one is read, when ctx is done
// (ctx.Err()), or when the Userfaultfd is closed (fs.ErrClosed), and never
// blocks Close. Several goroutines may read at once; each event goes to one
// of them.
//
// The faults read here are the caller's to resolve: every one must get Copy,
// ZeroPage, Poison or Wake, or its thread waits until Close. Serve does
// that bookkeeping, and lets Close resolve faults it has read; prefer it.
// Unmap events are applied to this package's record of registered ranges
// before they are returned.
func (u *Userfaultfd) ReadEvents(ctx context.Context, evs []Event) (int, error) {
	if len(evs) == 0 {
		return 0, invalid("ReadEvents", "no room for events")
	}
	raw := make([]byte, len(evs)*msgSize)
	var cancel *waker
	if ctx.Done() != nil {
		// An eventfd for this call, written when ctx is done, wakes the poll.
		var err error
		if cancel, err = newWaker(); err != nil {
			return 0, err
		}
		stop := context.AfterFunc(ctx, cancel.wake)
		defer func() {
			stop()
			cancel.close() // after a running callback's wake, which holds cancel.mu
		}()
	}
	return u.read(ctx, nil, cancel, evs, raw)
}

// read waits for and reads events into evs. For a Serve loop s, faults read
// are recorded as held by s before u.mu is released, so that Close sees them,
// and Remove and Unmap events are numbered (see order). cancel, if not nil, is
// written when ctx is done.
func (u *Userfaultfd) read(ctx context.Context, s *server, cancel *waker, evs []Event, raw []byte) (int, error) {
	select {
	case u.readSem <- struct{}{}:
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-u.done:
		return 0, closedError("ReadEvents")
	}
	defer func() { <-u.readSem }()
	for {
		fd, err := u.enter("ReadEvents")
		if err != nil {
			return 0, err
		}
		if u.closing.Load() {
			u.leave()
			return 0, closedError("ReadEvents")
		}
		n, e := u.readOnce(fd, raw, evs)
		if e == 0 && n > 0 {
			u.admit(s, evs[:n])
			u.leave()
			return n, nil
		}
		if e != 0 && e != unix.EAGAIN && e != unix.EINTR {
			u.leave()
			return 0, fmt.Errorf("uffd: %w", os.NewSyscallError("read", e))
		}
		if err := ctx.Err(); err != nil {
			u.leave()
			return 0, err
		}
		// Nothing queued: wait for the userfaultfd, Close or ctx. poll on a
		// userfaultfd is level-triggered and reports queued faults and events.
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(u.stop.fd), Events: unix.POLLIN}}
		if cancel != nil {
			pfd = append(pfd, unix.PollFd{Fd: int32(cancel.fd), Events: unix.POLLIN})
		}
		_, perr := unix.Poll(pfd, -1)
		u.leave()
		if perr != nil && perr != unix.EINTR {
			return 0, fmt.Errorf("uffd: %w", os.NewSyscallError("poll", perr))
		}
		if pfd[1].Revents != 0 {
			return 0, closedError("ReadEvents")
		}
		if len(pfd) > 2 && pfd[2].Revents != 0 {
			if err := ctx.Err(); err != nil {
				return 0, err
			}
		}
	}
}

// readOnce reads the queued events without waiting, decodes them, fills in
// their pages and applies Unmap events to the tracked ranges. The caller
// holds u.mu (read or write).
func (u *Userfaultfd) readOnce(fd int, raw []byte, evs []Event) (int, unix.Errno) {
	n, err := unix.Read(fd, raw[:len(evs)*msgSize])
	if err != nil {
		e, _ := err.(unix.Errno)
		if e == 0 {
			e = unix.EIO
		}
		return 0, e
	}
	k := n / msgSize
	for i := range k {
		ev := decodeMsg(raw[i*msgSize : (i+1)*msgSize])
		switch ev.Kind {
		case PageFault:
			ev.Page, ev.PageSize, _, _ = u.pageOf(ev.Addr)
		case Unmap:
			u.rmu.Lock()
			u.untrack(ev.Start, ev.End)
			u.rmu.Unlock()
		}
		evs[i] = ev
	}
	return k, 0
}

// admit hands a batch just read to the Serve loop s (nil for ReadEvents):
// its faults are held by s and its other events numbered.
func (u *Userfaultfd) admit(s *server, evs []Event) {
	if s == nil {
		return
	}
	s.hold(evs)
	s.barrier = u.order.admit(evs)
}
