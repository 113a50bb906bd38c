package arena

import "github.com/gmem-vmm/gmem/internal/fault"

// catchFault runs fn and returns the address of a memory fault it raised:
// SIGSEGV (a PROT_NONE page) and SIGBUS (a shared file mapping past the end
// of a truncated file, an exhausted hugetlb pool) both come back as an
// address, not a crash. Panics that are not memory faults are re-raised. It
// is internal/fault's Catch; the accesses that can fault under -race are
// this package's assembly (atomic_unsafe.go), which Catch can recover from
// and sync/atomic's race-detector runtime could not.
func catchFault(fn func()) (addr uintptr, faulted bool) { return fault.Catch(fn) }
