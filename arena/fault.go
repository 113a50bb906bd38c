package arena

import (
	"runtime/debug"
)

// catchFault runs fn with the runtime told to turn a memory fault into a panic
// (debug.SetPanicOnFault) and recovers that panic, returning the faulting
// address. SIGSEGV (a PROT_NONE page) and SIGBUS (a shared file mapping past
// the end of a truncated file, an exhausted hugetlb pool) both arrive this way.
// Panics that are not memory faults are re-raised.
func catchFault(fn func()) (addr uintptr, faulted bool) {
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
