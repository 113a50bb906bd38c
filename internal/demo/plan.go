//go:build amd64

package demo

import (
	"fmt"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
)

// Sizes the demo accepts, and the constants its plan is made of.
const (
	// MinSize is the smallest guest: two regions of 2 MiB.
	MinSize = 2 * regionAlign
	// MaxSize is the largest guest: its layout, hole included, must lie in
	// the 64 GiB of guest-physical space the guest harness identity-maps.
	MaxSize = mappedGPA - hole

	// hole is the gap between the two regions: guest accesses there are MMIO.
	hole = 64 << 20
	// regionAlign is what both regions' sizes and addresses are a multiple
	// of: the largest page any backing uses, so that hugetlb works too.
	regionAlign = 2 << 20
	// mappedGPA is how much guest-physical space, from 0, the guest
	// harness identity-maps (guest.Config.MapGiB's default and maximum).
	mappedGPA = 64 << 30
	// page is the unit the guest writes, sums and verifies, and the unit
	// of KVM's dirty log and of guestmem's DirtySet.
	page = 4096
	// hugePage is the page size of the Hugetlb backing.
	hugePage = 2 << 20

	// The dirty step: the guest rewrites guestDirtyPages pages of the
	// first region, and the host writes one word into each of
	// hostDirtyPages pages of the second, hostDirtyStride pages apart, or
	// fewer and closer where a region is smaller.
	guestDirtyPages = 100
	hostDirtyPages  = 10
	hostDirtyStride = 64
)

// Layout splits size into two regions around a 64 MiB hole. The first is
// half the size rounded up to 2 MiB, the second the rest, so a size that is
// an odd number of 2 MiB (6 MiB: 4 + 2) makes them uneven. size must be a
// multiple of 2 MiB from MinSize to MaxSize.
func Layout(size uint64) (guestmem.Layout, error) {
	if size < MinSize || size > MaxSize || size%regionAlign != 0 {
		return nil, fmt.Errorf("demo: guest size %d must be a multiple of 2 MiB from %d MiB to %d MiB", size,
			MinSize>>20, MaxSize>>20)
	}
	first := (size/2 + regionAlign - 1) / regionAlign * regionAlign
	return guestmem.Layout{
		{GPA: 0, Size: first},
		{GPA: guestmem.GuestAddress(first + hole), Size: size - first},
	}, nil
}

// Plan is where every step of the demo reads and writes, and what it must
// find, computed from the size and the backing alone, so that it can be
// checked without KVM: every address lies in the layout.
type Plan struct {
	Layout guestmem.Layout
	// PageSize is the backing's page size: what Discard must be aligned to.
	PageSize uint64
	// SysBase is the guest-physical address of the guest harness's 2 MiB
	// system slot (guest.Config.SysBase): 2 MiB above the end of guest RAM,
	// so that it overlaps no region whatever the size. (The harness's
	// default, just below 4 GiB, lies inside any guest of about 4 GiB or
	// more in this layout.)
	SysBase uint64
	// Pages is the number of 4 KiB pages of guest RAM. The guest writes
	// each, and the first dirty count is all of them.
	Pages uint64
	// GuestDirty is the range the guest rewrites in the dirty step: pages
	// at the start of the first region.
	GuestDirty guestmem.Span
	// HostDirty are the addresses where the host writes one word in the
	// dirty step: in the second region, each in a page of its own.
	HostDirty []guestmem.GuestAddress
	// Balloon is the range the balloon step discards: a quarter of the
	// first region, at its end, rounded down to the backing's page size
	// but at least one page of it. The guest then sums zeros there.
	Balloon guestmem.Span
	// SumRegion is the region whose checksum the guest and the host
	// compare, and which the snapshot restores are checked by.
	SumRegion int
}

// NewPlan plans the demo for a guest of size bytes backed by b.
func NewPlan(size uint64, b guestmem.Backing) (Plan, error) {
	layout, err := Layout(size)
	if err != nil {
		return Plan{}, err
	}
	p := Plan{Layout: layout, PageSize: page, Pages: size / page, SumRegion: 1}
	if b == guestmem.Hugetlb {
		p.PageSize = hugePage
	}
	first, second := layout[0], layout[1]
	end := uint64(second.GPA) + second.Size
	p.SysBase = end + guest.SysSize

	p.GuestDirty = guestmem.Span{GPA: first.GPA, Size: min(guestDirtyPages, first.Size/page) * page}

	n := min(hostDirtyPages, second.Size/page)
	stride := min(hostDirtyStride, second.Size/page/n)
	for i := range n {
		p.HostDirty = append(p.HostDirty, second.GPA+guestmem.GuestAddress(i*stride*page))
	}

	quarter := max(first.Size/4/p.PageSize*p.PageSize, p.PageSize)
	p.Balloon = guestmem.Span{GPA: first.GPA + guestmem.GuestAddress(first.Size-quarter), Size: quarter}
	return p, nil
}

// GuestDirtyPages is the number of pages the guest writes in the dirty step.
func (p Plan) GuestDirtyPages() uint64 { return p.GuestDirty.Size / page }

// DirtyAfter is the dirty count the dirty step must find after the guest
// and the host wrote their pages: the two sets do not overlap.
func (p Plan) DirtyAfter() uint64 { return p.GuestDirtyPages() + uint64(len(p.HostDirty)) }
