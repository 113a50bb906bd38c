package guestmem

import (
	"fmt"
	"io/fs"
	"math/bits"
	"os"
	"runtime"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/numa"
)

// NUMAPolicy is a host memory policy for guest RAM: which of the host's
// NUMA nodes its pages come from. It is arena.NUMAPolicy; the zero value is
// the default policy (the faulting thread's node, usually).
type NUMAPolicy = arena.NUMAPolicy

// NUMABind places guest RAM on nodes only (MPOL_BIND): when they are full,
// Prefault fails rather than taking memory from another node.
func NUMABind(nodes ...int) NUMAPolicy { return arena.NUMABind(nodes...) }

// NUMAPreferred places guest RAM on node, and on other nodes when it is
// full (MPOL_PREFERRED).
func NUMAPreferred(node int) NUMAPolicy { return arena.NUMAPreferred(node) }

// NUMAInterleave spreads guest RAM page by page over nodes
// (MPOL_INTERLEAVE): bandwidth over locality.
func NUMAInterleave(nodes ...int) NUMAPolicy { return arena.NUMAInterleave(nodes...) }

// ErrNUMANode is wrapped by the error of New or Restore given a policy
// (WithNUMA) on a NUMA node that does not exist or has no memory. It is
// arena.ErrNUMANode, so errors.Is matches either.
var ErrNUMANode = arena.ErrNUMANode

// numaRule is one WithNUMA: a policy for the guest RAM in spans (none: all
// of it).
type numaRule struct {
	policy NUMAPolicy
	spans  []Span
	cpus   []int // the CPUs of the policy's nodes, for prefault workers
}

// placement is where guest RAM goes and whether it is merged: the WithNUMA
// and WithKSM options, checked by config.check and fixed from New on.
type placement struct {
	rules    []numaRule
	ksm      bool
	nodeRoot fs.FS // where /sys is read; nil is the host's
}

// WithNUMA gives the guest RAM in spans (none: all of it) host memory
// policy p, applied with mbind(2) (MPOL_MF_STRICT|MPOL_MF_MOVE) as each
// region is mapped, before anything populates it: regions from New and
// Restore, and regions AddRegion adds later inside the spans, which may
// therefore name guest-physical ranges not yet in the layout. Spans are
// page-aligned (hugetlb-page-aligned) and must not overlap another
// WithNUMA's; a WithNUMA with spans wins over one without. Prefault runs
// the workers populating a bound, preferred or interleaved range on the
// CPUs of its nodes. Every node must exist and have memory: otherwise New
// fails, before anything is mapped, with an error wrapping ErrNUMANode
// that names the nodes that have memory. A File backing and RestoreLazy
// take no policy (ErrBadOption): their pages come from the page cache,
// which a mapping's policy does not place.
func WithNUMA(p NUMAPolicy, spans ...Span) Option {
	return func(c *config) {
		c.place.rules = append(c.place.rules, numaRule{policy: p, spans: append([]Span(nil), spans...)})
	}
}

// withNodeRoot reads the host's NUMA nodes from root (a host's "/") instead
// of the running host's: for tests that need nodes this host lacks.
func withNodeRoot(root fs.FS) Option { return func(c *config) { c.place.nodeRoot = root } }

// checkPlacement refuses, for op, the WithNUMA and WithKSM options that
// cannot be applied: before anything is mapped.
func (c *config) checkPlacement(op string) error {
	p := &c.place
	if len(p.rules) == 0 && !p.ksm {
		return nil
	}
	if op == "RestoreLazy" {
		return fmt.Errorf("guestmem: %s: %w: WithNUMA and WithKSM do not apply to lazily restored memory, "+
			"whose pages come from the snapshot files' page cache; use Restore", op, ErrBadOption)
	}
	if p.ksm && c.backing == GuestMemfd {
		return fmt.Errorf("guestmem: %s: %w: %w: WithKSM needs Anonymous guest RAM: KSM merges only private "+
			"anonymous pages, and guest_memfd takes MADV_MERGEABLE without ever merging", op, ErrBacking,
			ErrGuestMemfdLimit)
	}
	if p.ksm && c.backing != Anonymous {
		return fmt.Errorf("guestmem: %s: %w: WithKSM needs Anonymous guest RAM: KSM merges only private "+
			"anonymous pages, never %v memory", op, ErrBacking, c.backing)
	}
	if len(p.rules) == 0 {
		return nil
	}
	if c.backing == File {
		return fmt.Errorf("guestmem: %s: %w: WithNUMA does not apply to a File backing, whose pages come from "+
			"the page cache, which a mapping's policy does not place", op, ErrBadOption)
	}
	pageSize := uint64(os.Getpagesize())
	if c.backing == Hugetlb && c.hugeSize > pageSize && bits.OnesCount64(c.hugeSize) == 1 {
		pageSize = c.hugeSize
	}
	root := p.nodeRoot
	if root == nil {
		root = os.DirFS("/")
	}
	catchAll := 0
	var all []Span
	for i := range p.rules {
		r := &p.rules[i]
		nodes := r.policy.Nodes()
		switch {
		case r.policy.IsDefault():
		case len(nodes) == 0:
			return fmt.Errorf("guestmem: %s: WithNUMA(%v): %w: the policy names no node", op, r.policy, ErrBadOption)
		case nodes[0] < 0 || nodes[len(nodes)-1] > numa.MaxNode:
			return fmt.Errorf("guestmem: %s: WithNUMA(%v): %w: nodes are 0 to %d", op, r.policy, ErrBadOption,
				numa.MaxNode)
		default:
			found, err := numa.Check(root, nodes)
			if err != nil {
				return fmt.Errorf("guestmem: %s: WithNUMA(%v): %w: %w", op, r.policy, ErrNUMANode, err)
			}
			for _, n := range found {
				r.cpus = append(r.cpus, n.CPUs()...)
			}
		}
		if len(r.spans) == 0 {
			if catchAll++; catchAll > 1 {
				return fmt.Errorf("guestmem: %s: %w: two WithNUMA without spans; give one for all of guest RAM",
					op, ErrBadOption)
			}
		}
		for _, s := range r.spans {
			switch {
			case s.Size == 0:
				return &AddressError{Op: op, GPA: s.GPA, Err: fmt.Errorf("%w: an empty WithNUMA span", ErrZeroSize)}
			case uint64(s.GPA)%pageSize != 0 || s.Size%pageSize != 0:
				return &AddressError{Op: op, GPA: s.GPA, Len: s.Size,
					Err: fmt.Errorf("%w: a WithNUMA span (page size %#x)", ErrUnaligned, pageSize)}
			case s.Size > uint64(c.top) || s.GPA > c.top-GuestAddress(s.Size):
				return &AddressError{Op: op, GPA: s.GPA, Len: s.Size,
					Err: fmt.Errorf("%w: a WithNUMA span past the top of guest memory %v", ErrAddressOverflow, c.top)}
			}
			for _, o := range all {
				if s.GPA < o.GPA+GuestAddress(o.Size) && o.GPA < s.GPA+GuestAddress(s.Size) {
					return fmt.Errorf("guestmem: %s: %w: WithNUMA spans [%v, +%#x) and [%v, +%#x) overlap",
						op, ErrBadOption, s.GPA, s.Size, o.GPA, o.Size)
				}
			}
			all = append(all, s)
		}
	}
	return nil
}

// applyPlacement gives the freshly mapped region r its NUMA policy and KSM
// advice, before anything populates it.
func (m *Memory) applyPlacement(r *region) error {
	p := &m.place
	apply := func(s Span, pol NUMAPolicy) error {
		lo, hi := max(s.GPA, r.GPA), min(s.GPA+GuestAddress(s.Size), r.End())
		if lo >= hi {
			return nil
		}
		return r.host.SetNUMAPolicy(r.arenaOff+int64(lo-r.GPA), int64(hi-lo), pol)
	}
	for _, rule := range p.rules { // the catch-all first: the spans' rules override it
		if len(rule.spans) == 0 {
			if err := apply(Span{GPA: r.GPA, Size: r.Size}, rule.policy); err != nil {
				return err
			}
		}
	}
	for _, rule := range p.rules {
		for _, s := range rule.spans {
			if err := apply(s, rule.policy); err != nil {
				return err
			}
		}
	}
	if p.ksm {
		return r.host.UseKSM(r.arenaOff, int64(r.Size))
	}
	return nil
}

// cpusFor returns the CPUs of the nodes of the policy covering gpa: where
// a prefault worker populating from gpa should run. None for the default.
func (p *placement) cpusFor(gpa GuestAddress) []int {
	var catchAll []int
	for _, rule := range p.rules {
		if len(rule.spans) == 0 {
			catchAll = rule.cpus
		}
		for _, s := range rule.spans {
			if gpa >= s.GPA && gpa-s.GPA < GuestAddress(s.Size) {
				return rule.cpus
			}
		}
	}
	return catchAll
}

// pinnedHook, when set (by tests), runs on a prefault worker's thread
// while it is pinned to a node's CPUs.
var pinnedHook func()

// populate prefaults [off, off+n) of a, guest RAM from gpa. When a policy
// places it on some nodes, the calling goroutine's thread runs on those
// nodes' CPUs meanwhile (as Cloud Hypervisor's prefault threads do), so the
// kernel zeroes the pages from a CPU near them; its affinity is restored
// afterwards. Pinning is a speed-up only: where it cannot be done (the CPUs
// are outside this process's cpuset), the range is populated unpinned.
func (m *Memory) populate(a *arena.Arena, off, n int64, gpa GuestAddress, fdOff int64) error {
	fill := func() error { return a.Populate(off, n, arena.PopulateWrite) }
	if m.gmem != nil && gmemPrefault == gmemFallocate {
		fill = func() error { return m.gmemAllocate(fdOff, n) }
	}
	cpus := m.place.cpusFor(gpa)
	if len(cpus) == 0 {
		return fill()
	}
	runtime.LockOSThread()
	var old, set unix.CPUSet
	if unix.SchedGetaffinity(0, &old) != nil {
		runtime.UnlockOSThread()
		return fill()
	}
	for _, c := range cpus {
		if c < len(set)*64 && old.IsSet(c) {
			set.Set(c)
		}
	}
	if set.Count() == 0 || set == old || unix.SchedSetaffinity(0, &set) != nil {
		runtime.UnlockOSThread()
		return fill()
	}
	if pinnedHook != nil {
		pinnedHook()
	}
	err := fill()
	if unix.SchedSetaffinity(0, &old) == nil {
		runtime.UnlockOSThread()
	}
	// Otherwise the thread stays locked to this goroutine and exits with it,
	// so no other goroutine runs with the pinned affinity.
	return err
}

// NUMAPolicyAt returns the host memory policy of the page at gpa as the
// kernel reports it (get_mempolicy(MPOL_F_ADDR)).
func (m *Memory) NUMAPolicyAt(gpa GuestAddress) (NUMAPolicy, error) {
	const op = "NUMAPolicyAt"
	t, err := m.acquire(op)
	if err != nil {
		return NUMAPolicy{}, err
	}
	defer t.release()
	pieces, err := t.resolve(op, gpa, 1)
	if err != nil {
		return NUMAPolicy{}, err
	}
	pc := pieces[0]
	p, err := pc.a.NUMAPolicyAt(pc.off)
	return p, pc.inGuestTerms(op, err)
}

// NodePages counts, per host NUMA node, the bytes of the spans (the whole
// guest if none) present in memory, as the kernel reports them
// (move_pages(2), which moves nothing here). Pages never touched are in no
// node. Over hugetlb memory each huge page counts once per base page.
func (m *Memory) NodePages(spans ...Span) (map[int]uint64, error) {
	out := map[int]uint64{}
	page := uint64(os.Getpagesize())
	err := m.each("NodePages", spans, func(a *arena.Arena, off, n int64) error {
		nodes, err := a.PageNodes(off, n)
		for _, node := range nodes {
			if node >= 0 {
				out[node] += page
			}
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
