// Package reentry lets a resource that runs user code while it is held — a
// reader or writer handed to a copy, a progress callback — refuse a call
// from that user code that would wait for the resource, instead of
// deadlocking. It tells the goroutine holding the resource from any other:
// another goroutine's call may wait, the holder's own call cannot.
package reentry

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// ErrReentered is wrapped by the error Check returns: the call was made from
// a callback that holds what the call would wait for.
var ErrReentered = errors.New("called from a callback that holds what the call waits for")

// Guard records the goroutines running user code while holding a resource.
// The zero Guard is ready; it must not be copied after first use.
type Guard struct {
	n  atomic.Int32 // goroutines inside; 0 keeps Check to one atomic load
	mu sync.Mutex
	in map[uintptr]holder
}

type holder struct {
	op    string // the call whose callback is running, e.g. "Save"
	depth int    // nested Enters of this goroutine
}

// Enter records that the calling goroutine is about to run user code on
// behalf of op while holding the resource; Leave ends it. Enters nest.
func (g *Guard) Enter(op string) {
	id := goroutine()
	g.mu.Lock()
	if g.in == nil {
		g.in = map[uintptr]holder{}
	}
	h := g.in[id]
	if h.depth == 0 {
		h.op = op
	}
	h.depth++
	g.in[id] = h
	g.mu.Unlock()
	g.n.Add(1)
}

// Leave undoes the calling goroutine's last Enter.
func (g *Guard) Leave() {
	id := goroutine()
	g.mu.Lock()
	h := g.in[id]
	if h.depth <= 1 {
		delete(g.in, id)
	} else {
		h.depth--
		g.in[id] = h
	}
	g.mu.Unlock()
	g.n.Add(-1)
}

// Holding reports whether the calling goroutine is inside an Enter, and for
// which call.
func (g *Guard) Holding() (op string, ok bool) {
	if g.n.Load() == 0 {
		return "", false
	}
	id := goroutine()
	g.mu.Lock()
	h, ok := g.in[id]
	g.mu.Unlock()
	return h.op, ok
}

// Check returns an error wrapping ErrReentered, naming call and the holder,
// when the calling goroutine is inside an Enter; else nil.
func (g *Guard) Check(call string) error {
	op, ok := g.Holding()
	if !ok {
		return nil
	}
	return fmt.Errorf("%s %w (%s, which runs it, holds the memory until it returns; call %s after it)",
		call, ErrReentered, op, call)
}
