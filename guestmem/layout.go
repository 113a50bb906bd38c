package guestmem

import (
	"errors"
	"fmt"
	"slices"
)

// GuestAddress is a guest-physical address.
type GuestAddress uint64

// String formats the address as hex, as guest addresses are usually written.
func (a GuestAddress) String() string { return fmt.Sprintf("%#x", uint64(a)) }

// MaxGuestAddress is the default top of the guest-physical address space:
// 2^52, the architectural limit of x86-64 physical addresses. Regions must
// end at or below it (WithMaxAddress lowers it to a CPU's MAXPHYADDR).
const MaxGuestAddress GuestAddress = 1 << 52

// RegionSpec describes one region of a layout.
type RegionSpec struct {
	GPA      GuestAddress // first guest-physical address; page-aligned
	Size     uint64       // bytes; a multiple of the page size
	ReadOnly bool         // the guest may read but not write (a ROM, or firmware)
}

// End returns the first address past the region (GPA + Size).
func (r RegionSpec) End() GuestAddress { return r.GPA + GuestAddress(r.Size) }

// Layout is the guest-physical memory map: the regions of guest RAM, in any
// order. Validate checks it; New sorts it by address.
type Layout []RegionSpec

// Errors of layout validation. Each is wrapped in a *LayoutError that names
// the region at fault.
var (
	ErrEmptyLayout = errors.New("layout has no regions")
	ErrZeroSize    = errors.New("zero size")
	ErrUnaligned   = errors.New("address or size not aligned")
	ErrOverlap     = errors.New("regions overlap")
	ErrOverflow    = errors.New("region extends past the top of the guest address space")
)

// LayoutError reports which region of a layout is invalid and why.
type LayoutError struct {
	Op     string     // the call that was given the layout, if not New
	Index  int        // index of the region in the layout as given
	Region RegionSpec // the region
	Other  int        // for ErrOverlap, the index of the region it overlaps; -1 otherwise
	Err    error      // the sentinel
}

func (e *LayoutError) Error() string {
	op := ""
	if e.Op != "" {
		op = e.Op + ": "
	}
	msg := fmt.Sprintf("guestmem: %sregion %d [%v, +%#x): %v", op, e.Index, e.Region.GPA, e.Region.Size, e.Err)
	if e.Other >= 0 {
		msg += fmt.Sprintf(" (region %d)", e.Other)
	}
	return msg
}

// Unwrap returns the sentinel.
func (e *LayoutError) Unwrap() error { return e.Err }

// Validate checks the layout against the page size (or a larger alignment,
// such as a hugetlb page size) and the top of the guest address space.
func (l Layout) Validate(align uint64, top GuestAddress) error {
	if len(l) == 0 {
		return fmt.Errorf("guestmem: %w", ErrEmptyLayout)
	}
	bad := func(i int, err error) error { return &LayoutError{Index: i, Region: l[i], Other: -1, Err: err} }
	for i, r := range l {
		switch {
		case r.Size == 0:
			return bad(i, ErrZeroSize)
		case uint64(r.GPA)%align != 0 || r.Size%align != 0:
			return bad(i, fmt.Errorf("%w (alignment %#x)", ErrUnaligned, align))
		case r.Size > uint64(top) || r.GPA > top-GuestAddress(r.Size):
			return bad(i, fmt.Errorf("%w (top %v)", ErrOverflow, top))
		}
	}
	order := make([]int, len(l))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return cmpAddr(l[a].GPA, l[b].GPA) })
	for k := 1; k < len(order); k++ {
		prev, cur := order[k-1], order[k]
		if l[cur].GPA < l[prev].End() {
			return &LayoutError{Index: cur, Region: l[cur], Other: prev, Err: ErrOverlap}
		}
	}
	return nil
}

func cmpAddr(a, b GuestAddress) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Size returns the total bytes of RAM in the layout.
func (l Layout) Size() uint64 {
	var n uint64
	for _, r := range l {
		n += r.Size
	}
	return n
}

// The x86 PC memory map leaves the 32-bit PCI hole, [3 GiB, 4 GiB), for
// device MMIO, the local APIC and firmware, as QEMU, crosvm and Firecracker do.
const (
	X86PCIHoleStart GuestAddress = 3 << 30
	X86HighMemStart GuestAddress = 4 << 30
)

// X86Layout returns the usual x86 layout for ramSize bytes of RAM: up to
// 3 GiB at address 0, the rest from 4 GiB up. ramSize must be page-aligned.
func X86Layout(ramSize uint64) Layout {
	low := min(ramSize, uint64(X86PCIHoleStart))
	l := Layout{{GPA: 0, Size: low}}
	if ramSize > low {
		l = append(l, RegionSpec{GPA: X86HighMemStart, Size: ramSize - low})
	}
	return l
}
