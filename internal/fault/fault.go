// Package fault turns a memory fault in Go code into a value: the one place
// the project sets debug.SetPanicOnFault and recovers what it raises.
//
// The runtime raises such a panic only for a fault in Go code (or Go
// assembly) on the goroutine that set the flag: a fault in C (cgo, or the
// race detector's runtime, where sync/atomic runs under -race) still kills
// the process, which is why the arena's atomics are assembly of its own, and
// a goroutine that fn starts is not covered. A fault in the first page (a nil
// dereference) stays an ordinary runtime panic.
package fault

import (
	"fmt"
	"runtime/debug"
)

// Catch runs fn with the runtime told to turn a memory fault into a panic
// (debug.SetPanicOnFault) and recovers that panic, returning the faulting
// address. SIGSEGV (a PROT_NONE page) and SIGBUS (a shared file mapping past
// the end of a truncated file, an exhausted hugetlb pool, a poisoned page)
// both arrive this way. Panics that are not memory faults are re-raised. The
// goroutine's setting is restored when Catch returns.
func Catch(fn func()) (addr uintptr, faulted bool) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if f, ok := r.(interface{ Addr() uintptr }); ok {
			addr, faulted = f.Addr(), true
			return
		}
		panic(r)
	}()
	fn()
	return 0, false
}

// Error is a memory fault that Do caught.
type Error struct {
	Addr uintptr // the address the hardware refused
}

func (e *Error) Error() string { return fmt.Sprintf("memory fault at address %#x", e.Addr) }

// Do runs fn as Catch does and returns fn's error, or an *Error naming the
// faulting address if fn faulted.
func Do(fn func() error) error {
	var err error
	if addr, faulted := Catch(func() { err = fn() }); faulted {
		return &Error{Addr: addr}
	}
	return err
}
