//go:build linux

package uffd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sync"
)

// Handler serves one event. For a PageFault it fills ev.Page (ev.PageSize
// bytes) with Copy or ZeroPage, or fails it with Poison, and returns nil —
// or an error, and Serve resolves the fault with the fallback. For Remove and
// Unmap it records the range (a removed page that faults again is to be
// served as zeros). It runs on Serve's goroutine, holding no lock of the
// Userfaultfd: it may call any method, Close included.
//
// Returning an error wrapping ErrAgain (what Copy returns while the address
// space is changing) defers the fault: Serve reads the queued events, hands
// the Remove and Unmap among them to the handler first, and then calls the
// handler again for the fault. ErrPresent means the page is there, which
// serves the fault; ErrUnmapped and ErrExited mean there is nothing left to
// serve.
type Handler func(ev Event) error

// server is one running Serve: the faults it has read and not yet resolved.
type server struct {
	mu      sync.Mutex
	held    map[uintptr]int // fault address -> events held
	barrier uint64          // its faults wait for the events numbered up to this (see order)
}

// hold records faults read, before the reader releases u.mu.
func (s *server) hold(evs []Event) {
	s.mu.Lock()
	for _, ev := range evs {
		if ev.Kind == PageFault {
			s.held[ev.Addr]++
		}
	}
	s.mu.Unlock()
}

// release records a held fault as resolved.
func (s *server) release(ev Event) {
	s.mu.Lock()
	if s.held[ev.Addr] <= 1 {
		delete(s.held, ev.Addr)
	} else {
		s.held[ev.Addr]--
	}
	s.mu.Unlock()
}

// take hands the held faults to Close.
func (s *server) take() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	evs := make([]Event, 0, len(s.held))
	for addr := range s.held {
		evs = append(evs, Event{Kind: PageFault, Addr: addr})
	}
	clear(s.held)
	return evs
}

// item is an event Serve is dispatching: failed holds the handler's error
// once the fault is being resolved with the fallback instead.
type item struct {
	ev     Event
	failed error
}

// batchSize is how many events Serve reads at once.
const batchSize = 64

// Serve reads events and hands each to h, until ctx is done (it returns
// ctx.Err()), the Userfaultfd is closed (fs.ErrClosed), or a handler fails
// (the first such error, once the rest of the batch read is dispatched).
// Several Serve loops may run at once, on one goroutine each; each event goes
// to one of them.
//
// Every fault Serve reads is resolved before it returns: by h, or, when h
// fails, by the fallback (Poison or ZeroFill), so no thread is left waiting
// on a handler's error; if Close comes first, Close resolves it. A fault
// deferred with ErrAgain is retried after the events queued behind it.
func (u *Userfaultfd) Serve(ctx context.Context, h Handler) error {
	if h == nil {
		return invalid("Serve", "nil handler")
	}
	cancel, err := newWaker()
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, cancel.wake)
	defer func() {
		stop()
		cancel.close()
	}()
	s := &server{held: map[uintptr]int{}}
	u.smu.Lock()
	u.servers[s] = struct{}{}
	u.smu.Unlock()
	defer func() {
		u.smu.Lock()
		delete(u.servers, s)
		u.smu.Unlock()
	}()

	evs := make([]Event, batchSize)
	raw := make([]byte, batchSize*msgSize)
	for {
		n, err := u.read(ctx, s, cancel, evs, raw)
		if err != nil {
			return err
		}
		if err := u.dispatch(s, h, evs[:n], raw); err != nil {
			return err
		}
	}
}

// dispatch hands a batch of events to h and resolves every fault in it.
func (u *Userfaultfd) dispatch(s *server, h Handler, batch []Event, raw []byte) error {
	var first error
	// Remove and Unmap first: the kernel returns faults ahead of events in
	// each read, but the madvise or munmap behind an event read here may
	// already have dropped its pages, and a fault on them is to be served as
	// the event says (zeros), not from the snapshot.
	queue := make([]item, 0, len(batch))
	queue = appendItems(queue, batch, false)
	queue = appendItems(queue, batch, true)
	more := make([]Event, batchSize)
	for attempt := 0; len(queue) > 0; attempt++ {
		var deferred []item
		waited := false
		for _, it := range queue {
			if it.ev.Kind != PageFault {
				err := h(it.ev)
				u.order.done(it.ev)
				if err != nil && first == nil {
					first = fmt.Errorf("uffd: handling %v: %w", it.ev, err)
				}
				continue
			}
			if !waited {
				// Faults go to the handler only after the Remove and Unmap
				// events read before them (this loop's own were just handled).
				u.order.wait(s.barrier)
				waited = true
			}
			again, err := u.serveFault(h, &it)
			switch {
			case again:
				deferred = append(deferred, it)
				continue
			case errors.Is(err, fs.ErrClosed):
				return err // Close resolved what s held
			case err != nil && first == nil:
				first = err
			}
			s.release(it.ev)
		}
		if len(deferred) == 0 {
			break
		}
		// The address space is changing: a Remove or Unmap is queued, or its
		// madvise or munmap is finishing. Take what is queued, so that those
		// events reach h before the faults are retried.
		n, err := u.tryRead(s, raw, more)
		if err != nil {
			return err
		}
		if n == 0 {
			backoff(attempt)
		}
		queue = appendItems(queue[:0], more[:n], false)
		queue = append(queue, deferred...)
		queue = appendItems(queue, more[:n], true)
	}
	return first
}

// appendItems appends the faults of evs, or the other events.
func appendItems(q []item, evs []Event, faults bool) []item {
	for _, ev := range evs {
		if (ev.Kind == PageFault) == faults {
			q = append(q, item{ev: ev})
		}
	}
	return q
}

// serveFault runs h for a fault, or the fallback once h has failed. again
// reports that the address space is changing and the fault must be retried.
func (u *Userfaultfd) serveFault(h Handler, it *item) (again bool, err error) {
	if it.failed == nil {
		err := h(it.ev)
		switch {
		case err == nil, errors.Is(err, ErrPresent):
			return false, nil
		case errors.Is(err, ErrAgain):
			return true, nil
		case errors.Is(err, fs.ErrClosed):
			return false, err
		case errors.Is(err, ErrUnmapped), errors.Is(err, ErrExited):
			_ = u.Wake(it.ev.Page, it.ev.PageSize)
			return false, nil
		}
		it.failed = fmt.Errorf("uffd: serving %v: %w; resolved with %v", it.ev, err, u.fallback)
	}
	fd, err := u.enter("Serve")
	if err != nil {
		return false, err
	}
	ferr := u.resolve(fd, it.ev)
	u.leave()
	switch {
	case ferr == nil:
		return false, it.failed
	case errors.Is(ferr, ErrAgain):
		return true, nil
	}
	// The fallback failed too: wake the thread, which faults again and
	// queues a new event.
	_ = u.Wake(it.ev.Page, it.ev.PageSize)
	return false, fmt.Errorf("%w; the fallback failed too: %w", it.failed, ferr)
}

// tryRead reads the events queued now, without waiting. If another reader
// is reading, the events are its to take, and tryRead reads nothing.
func (u *Userfaultfd) tryRead(s *server, raw []byte, evs []Event) (int, error) {
	select {
	case u.readSem <- struct{}{}:
	default:
		return 0, nil
	}
	defer func() { <-u.readSem }()
	fd, err := u.enter("Serve")
	if err != nil {
		return 0, err
	}
	defer u.leave()
	if u.closing.Load() {
		return 0, closedError("Serve")
	}
	n, _ := u.readOnce(fd, raw, evs)
	u.admit(s, evs[:n])
	return n, nil
}
