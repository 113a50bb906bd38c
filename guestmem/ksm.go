package guestmem

import (
	"fmt"

	"github.com/gmem-vmm/gmem/arena"
)

// WithKSM makes all guest RAM mergeable by the kernel's same-page merging
// (KSM, MADV_MERGEABLE), from New on, regions AddRegion adds included:
// ksmd may then back identical pages of this and other guests by one
// copy, copied again when a guest writes it. Merging is off by default; it
// costs ksmd's CPU time, and lets one guest time another's writes to pages
// they share (a side channel), so turn it on for trusted guests or where
// memory density matters more. ksmd runs only while /sys/kernel/mm/ksm/run
// is 1 (package host reports it). KSM merges only private anonymous pages,
// so WithKSM needs the Anonymous backing: with any other it is ErrBacking,
// naming the limit, rather than accepted and never merged.
func WithKSM() Option { return func(c *config) { c.place.ksm = true } }

// UseKSM makes the spans (the whole guest if none) mergeable by KSM
// (MADV_MERGEABLE), as WithKSM does for all of it; regions added later are
// mergeable only under WithKSM. It needs Anonymous guest RAM that was not
// lazily restored (whose pages are the snapshot file's page cache, shared
// already): otherwise ErrBacking.
func (m *Memory) UseKSM(spans ...Span) error {
	const op = "UseKSM"
	if m.backing == GuestMemfd {
		return fmt.Errorf("guestmem: %s: %w: %w: KSM merges only private anonymous pages, and guest_memfd takes "+
			"MADV_MERGEABLE without ever merging", op, ErrBacking, ErrGuestMemfdLimit)
	}
	if m.backing != Anonymous || m.overlay {
		what := m.backing.String()
		if m.overlay {
			what = "lazily restored"
		}
		return fmt.Errorf("guestmem: %s: %w: KSM merges only private anonymous pages, never %s memory", op,
			ErrBacking, what)
	}
	return m.each(op, spans, (*arena.Arena).UseKSM)
}

// NoKSM makes the spans (the whole guest if none) unmergeable again
// (MADV_UNMERGEABLE): their merged pages are copied back first, so the call
// allocates the memory merging saved, and can fail for want of it.
func (m *Memory) NoKSM(spans ...Span) error {
	return m.each("NoKSM", spans, (*arena.Arena).NoKSM)
}
