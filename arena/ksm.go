package arena

import (
	"errors"

	"golang.org/x/sys/unix"
)

// ErrNotMergeable is returned by UseKSM for memory the kernel's same-page
// merging (KSM) never merges: shared memory (MAP_SHARED, memfd and shmem)
// and hugetlb pages. KSM merges only private anonymous pages, including the
// copy-on-write copies of a private file mapping; the kernel itself accepts
// MADV_MERGEABLE on the rest and silently does nothing.
var ErrNotMergeable = errors.New("KSM merges only private, non-hugetlb memory")

// UseKSM makes the range mergeable (MADV_MERGEABLE): the kernel's ksmd may
// then replace identical pages of it, and of every other mergeable range on
// the host, by one write-protected copy, copied again on the next write.
// ksmd runs only while /sys/kernel/mm/ksm/run is 1. A range covering shared
// or hugetlb memory is ErrNotMergeable; a kernel without KSM answers EINVAL.
// smaps shows the range's VmFlags "mg" and, once merged, its KSM bytes.
func (m *Mapping) UseKSM(off, n int64) error {
	defer m.runlock(m.rlock())
	const op = "UseKSM"
	if err := m.checkPages(op, off, n, true); err != nil {
		return err
	}
	for _, e := range m.ents.within(off, n) {
		if e.shared || e.pageSize != pageSize {
			return &RangeError{Op: op, Offset: off, Length: n, Limit: m.size, Err: ErrNotMergeable}
		}
	}
	return m.madvise(op, off, n, unix.MADV_MERGEABLE)
}

// NoKSM makes the range unmergeable again (MADV_UNMERGEABLE): merged pages
// are copied back into private pages first, so the call allocates what
// merging saved. It is the default for every mapping, and harmless on
// memory that was never mergeable.
func (m *Mapping) NoKSM(off, n int64) error {
	return m.advise("NoKSM", off, n, unix.MADV_UNMERGEABLE)
}
