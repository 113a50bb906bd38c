package guestmem

import (
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/kvm"
)

// How Prefault fills GuestMemfd memory: the kernel takes both
// MADV_POPULATE_WRITE on the host mapping and fallocate on the guest_memfd
// (BenchmarkGuestMemfdPrefault measures them; docs/benchmarks.md has the
// figures).
const (
	// gmemPopulate: MADV_POPULATE_WRITE, which allocates the pages and maps
	// them in the host's page tables too.
	gmemPopulate = iota
	// gmemFallocate: fallocate(FALLOC_FL_KEEP_SIZE) on the guest_memfd,
	// which allocates the pages without mapping them for the host (KVM
	// maps guest_memfd pages for the guest from the file, not from the
	// host's page tables).
	gmemFallocate
)

// gmemPrefault is the method Prefault uses on GuestMemfd memory.
var gmemPrefault = gmemPopulate

// gmemAllocate allocates n bytes of the guest_memfd from offset off.
func (m *Memory) gmemAllocate(off, n int64) error {
	for {
		err := unix.Fallocate(m.fd, unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return os.NewSyscallError("fallocate", err)
		}
		return nil
	}
}

// GuestMemfd returns the guest_memfd backing guest RAM (WithGuestMemfd),
// owned by the Memory; nil for other backings.
func (m *Memory) GuestMemfd() *kvm.GuestMemfd { return m.gmem }
