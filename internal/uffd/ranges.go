//go:build linux

package uffd

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/gmem-vmm/gmem/internal/procfs"
)

// region is a registered range as this package tracks it.
type region struct {
	start, end uintptr
	pageSize   uintptr // the backing's page size: a huge page on hugetlb memory
	ioctls     Ioctls
}

// regionAt returns the tracked region containing addr.
func (u *Userfaultfd) regionAt(addr uintptr) (region, bool) {
	rs := *u.regions.Load()
	i, found := slices.BinarySearchFunc(rs, addr, func(r region, a uintptr) int {
		switch {
		case r.end <= a:
			return -1
		case r.start > a:
			return 1
		}
		return 0
	})
	if !found {
		return region{}, false
	}
	return rs[i], true
}

// pageOf returns the start and size of the page containing addr: of the
// registered range's page size, or the base page size outside any.
func (u *Userfaultfd) pageOf(addr uintptr) (page, size uintptr, r region, ok bool) {
	r, ok = u.regionAt(addr)
	size = u.basePage
	if ok {
		size = r.pageSize
	}
	return addr &^ (size - 1), size, r, ok
}

// track adds a region; u.rmu must be held.
func (u *Userfaultfd) track(r region) {
	rs := slices.Clone(*u.regions.Load())
	i, _ := slices.BinarySearchFunc(rs, r.start, func(x region, a uintptr) int {
		return cmp.Compare(x.start, a)
	})
	rs = slices.Insert(rs, i, r)
	u.regions.Store(&rs)
}

// untrack removes [start, end) from the tracked regions, splitting those it
// cuts; u.rmu must be held.
func (u *Userfaultfd) untrack(start, end uintptr) {
	old := *u.regions.Load()
	rs := make([]region, 0, len(old)+1)
	for _, r := range old {
		if r.end <= start || end <= r.start {
			rs = append(rs, r)
			continue
		}
		if r.start < start {
			left := r
			left.end = start
			rs = append(rs, left)
		}
		if end < r.end {
			right := r
			right.start = end
			rs = append(rs, right)
		}
	}
	u.regions.Store(&rs)
}

// vma is what /proc/self/smaps says about one mapping.
type vma struct {
	start, end     uintptr
	kernelPageSize uintptr
	flags          []string // VmFlags mnemonics; "um": registered for missing faults
}

// readSmaps calls f for each mapping of this process intersecting
// [start, end). It is read only where no system call can say (the page size
// of hugetlb memory; whether a range is still registered), never on a
// fault's path.
func readSmaps(start, end uintptr, f func(vma)) error {
	vmas, err := procfs.SmapsRange(start, end)
	if err != nil {
		return fmt.Errorf("uffd: %w", err)
	}
	for _, v := range vmas {
		if v.Start < end && start < v.End {
			f(vma{start: v.Start, end: v.End, kernelPageSize: uintptr(v.KernelPageSize), flags: v.Flags})
		}
	}
	return nil
}

// kernelPageSize returns the page size of the mappings covering
// [start, end), which must all have the same one: a huge page size on
// hugetlb memory, which no system call reports for an address.
func kernelPageSize(start, end uintptr) (uintptr, error) {
	var size uintptr
	var err error
	rerr := readSmaps(start, end, func(v vma) {
		if size != 0 && v.kernelPageSize != size && err == nil {
			err = invalid("Register", "[%#x, %#x) spans mappings of %d and %d byte pages", start, end, size, v.kernelPageSize)
		}
		size = v.kernelPageSize
	})
	switch {
	case rerr != nil:
		return 0, rerr
	case err != nil:
		return 0, err
	case size == 0:
		return 0, fmt.Errorf("uffd: no page size for [%#x, %#x) in /proc/self/smaps", start, end)
	}
	return size, nil
}
