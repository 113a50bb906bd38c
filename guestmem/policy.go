package guestmem

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/gmem-vmm/gmem/arena"
)

// Span is a guest-physical range for the memory-policy calls. It may cross
// region boundaries where regions are contiguous; it must be page-aligned.
type Span struct {
	GPA  GuestAddress
	Size uint64
}

// End returns the first address past the span.
func (s Span) End() GuestAddress { return s.GPA + GuestAddress(s.Size) }

// spans resolves the spans (none: the whole guest) to arena pieces,
// checking alignment to the backing's page size. The caller holds t.
func (m *Memory) spans(t *table, op string, spans []Span) ([]piece, error) {
	if len(spans) == 0 {
		all := make([]piece, len(t.regions))
		for i, r := range t.regions {
			all[i] = piece{region: i, a: r.host, off: r.arenaOff, n: int64(r.Size), gpa: r.GPA}
		}
		return all, nil
	}
	var out []piece
	for _, s := range spans {
		if s.Size == 0 {
			return nil, &AddressError{Op: op, GPA: s.GPA, Err: fmt.Errorf("%w: an empty span", ErrZeroSize)}
		}
		if uint64(s.GPA)%m.pageSize != 0 || s.Size%m.pageSize != 0 {
			return nil, &AddressError{Op: op, GPA: s.GPA, Len: s.Size,
				Err: fmt.Errorf("%w (page size %#x)", ErrUnaligned, m.pageSize)}
		}
		ps, err := t.resolve(op, s.GPA, s.Size)
		if err != nil {
			return nil, err
		}
		out = append(out, ps...)
	}
	return out, nil
}

// each applies fn to the arena pieces of the spans.
func (m *Memory) each(op string, spans []Span, fn func(a *arena.Arena, off, n int64) error) error {
	t, err := m.acquire(op)
	if err != nil {
		return err
	}
	defer t.release()
	pieces, err := m.spans(t, op, spans)
	if err != nil {
		return err
	}
	for _, pc := range pieces {
		if err := fn(pc.a, pc.off, pc.n); err != nil {
			return pc.inGuestTerms(op, err)
		}
	}
	return nil
}

// Prefetch starts readahead of the spans (the whole guest if none) without
// waiting for it (MADV_WILLNEED): useful for file-backed guest RAM.
func (m *Memory) Prefetch(spans ...Span) error {
	return m.each("Prefetch", spans, (*arena.Arena).Prefetch)
}

// ErrDataLoss is returned by a call that would lose guest data it was not
// asked to lose: DropPageCache on private guest RAM, whose dropped pages
// would read back as zeros (anonymous memory) or as the file's old contents
// (a File backing, lazily restored memory). Discard gives pages back on
// purpose.
var ErrDataLoss = errors.New("the call would lose guest data")

// DropPageCache drops the host mapping's pages of the spans (the whole guest
// if none) with MADV_DONTNEED, releasing this process's page-table and
// resident-set share of a shared backing (Memfd, Hugetlb, GuestMemfd): the
// data stays in the file and the next access maps it again, so the guest reads what it
// wrote. On private guest RAM (Anonymous, File, lazily restored memory) the
// same call would throw the guest's pages away, so it is refused with
// ErrDataLoss before anything is dropped; use Discard to free pages on
// purpose. Locked pages: an error wrapping ErrLocked.
func (m *Memory) DropPageCache(spans ...Span) error {
	const op = "DropPageCache"
	if m.backing != Memfd && m.backing != Hugetlb && m.backing != GuestMemfd {
		return fmt.Errorf("guestmem: %s: %w: %v guest RAM is private, so its dropped pages would read back as %s; "+
			"use Discard to give pages back on purpose", op, ErrDataLoss, m.backing, m.privateDropReads())
	}
	return m.each(op, spans, (*arena.Arena).DropPageCache)
}

// privateDropReads says what a dropped private page would read back as.
func (m *Memory) privateDropReads() string {
	if m.backing == Anonymous && !m.overlay {
		return "zeros"
	}
	return "the file's contents, not the guest's writes"
}

// LockOnFault locks the spans in memory as they are touched
// (mlock2(MLOCK_ONFAULT)). Past RLIMIT_MEMLOCK the error gives the limit and
// the request.
func (m *Memory) LockOnFault(spans ...Span) error {
	return m.each("LockOnFault", spans, (*arena.Arena).LockOnFault)
}

// Unlock unlocks the spans.
func (m *Memory) Unlock(spans ...Span) error {
	return m.each("Unlock", spans, (*arena.Arena).Unlock)
}

// UseHugepages asks for transparent hugepages over the spans (the whole
// guest if none; MADV_HUGEPAGE), as arena.Mapping.UseHugepages does (the
// default for new memory unless WithoutHugepages). Hugetlb memory is
// always huge, and guest_memfd never (ErrGuestMemfdLimit): the call is an
// error there.
func (m *Memory) UseHugepages(spans ...Span) error {
	return m.hugepages("UseHugepages", spans, (*arena.Arena).UseHugepages)
}

// NoHugepages forbids transparent hugepages over the spans (the whole guest
// if none; MADV_NOHUGEPAGE). Hugetlb memory: an error.
func (m *Memory) NoHugepages(spans ...Span) error {
	return m.hugepages("NoHugepages", spans, (*arena.Arena).NoHugepages)
}

func (m *Memory) hugepages(op string, spans []Span, fn func(a *arena.Arena, off, n int64) error) error {
	if m.backing == Hugetlb {
		return fmt.Errorf("guestmem: %s: %w: hugetlb memory is always huge", op, ErrBacking)
	}
	if m.backing == GuestMemfd {
		return fmt.Errorf("guestmem: %s: %w: guest_memfd has 4 KiB pages only (it takes MADV_HUGEPAGE and "+
			"ignores it)", op, ErrGuestMemfdLimit)
	}
	return m.each(op, spans, fn)
}

// PrefaultOptions tunes Prefault.
type PrefaultOptions struct {
	// Workers populating in parallel; 0 means runtime.GOMAXPROCS(0).
	Workers int
	// ChunkSize is the unit of work, rounded up to a multiple of 2 MiB (and
	// of the hugetlb page size) so hugepages are never split; 0 means 64 MiB.
	ChunkSize uint64
	// Spans to prefault; none means the whole guest.
	Spans []Span
	// Progress, if set, is called after each chunk with the bytes done and
	// the total, from one goroutine at a time, while Prefault holds the
	// region table: what would wait for it (Close, AddRegion, RemoveRegion,
	// ...) returns ErrReentered from there.
	Progress func(done, total uint64)
}

// DefaultPrefaultChunk is the default PrefaultOptions.ChunkSize.
const DefaultPrefaultChunk = 64 << 20

// Prefault populates guest memory before the guest runs, so neither the guest
// nor the VMM takes a page fault on it later: MADV_POPULATE_WRITE over
// hugepage-aligned chunks, by parallel workers (arena.Mapping.Populate falls
// back to touching pages on kernels before 5.14). Running out of memory or
// of hugetlb pages is returned here, never raised later as SIGBUS. Cancelling
// ctx stops the workers after their current chunk; the error then wraps
// ctx.Err().
func (m *Memory) Prefault(ctx context.Context, o PrefaultOptions) error {
	t, err := m.acquire("Prefault")
	if err != nil {
		return err
	}
	defer t.release()
	pieces, err := m.spans(t, "Prefault", o.Spans)
	if err != nil {
		return err
	}
	workers := o.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	align := max(uint64(hostAlign), m.pageSize)
	chunk := o.ChunkSize
	if chunk == 0 {
		chunk = DefaultPrefaultChunk
	}
	// No chunk need exceed the guest; clamping first keeps the rounding from
	// wrapping a huge ChunkSize around to zero.
	chunk = alignUp(min(chunk, 1<<50), align)

	// Cut every piece into chunks that end on chunk-aligned arena offsets
	// (arena offsets of regions are 2 MiB aligned, so chunks are too).
	type job piece
	var jobs []job
	var total uint64
	for _, pc := range pieces {
		for off, end := pc.off, pc.off+pc.n; off < end; {
			next := min(end, (off/int64(chunk)+1)*int64(chunk))
			jobs = append(jobs, job{region: pc.region, a: pc.a, off: off, n: next - off,
				gpa: pc.gpa + GuestAddress(off-pc.off)})
			off = next
		}
		total += uint64(pc.n)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next     atomic.Int64
		done     atomic.Uint64
		progress sync.Mutex
		errOnce  sync.Once
		firstErr error
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err; cancel() })
	}
	for w := 0; w < min(workers, len(jobs)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(jobs) {
					return
				}
				j := jobs[i]
				r := t.regions[j.region]
				if err := m.populate(j.a, j.off, j.n, j.gpa, r.FDOffset+int64(j.gpa-r.GPA)); err != nil {
					fail(piece(j).inGuestTerms("Prefault", err))
					return
				}
				// Count and report under one lock, so reports never go backwards.
				progress.Lock()
				d := done.Add(uint64(j.n))
				if o.Progress != nil {
					m.inCallback.Enter("Prefault") // Progress runs while Prefault holds the table
					o.Progress(d, total)
					m.inCallback.Leave()
				}
				progress.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil && done.Load() < total {
		return fmt.Errorf("guestmem: Prefault stopped after %d of %d bytes: %w", done.Load(), total, context.Cause(ctx))
	}
	return nil
}

// RegionStats is what the host kernel reports for one region.
type RegionStats struct {
	GPA       GuestAddress
	Size      uint64
	Resident  uint64 // bytes of the region mapped in this process (smaps Rss, plus hugetlb)
	Locked    uint64 // bytes locked (smaps Locked)
	HugePages uint64 // bytes mapped by huge pages: THP, shmem PMD or hugetlb
}

// Stats reports, per region, resident, locked and hugepage-backed bytes.
func (m *Memory) Stats() ([]RegionStats, error) {
	t, err := m.acquire("Stats")
	if err != nil {
		return nil, err
	}
	defer t.release()
	out := make([]RegionStats, len(t.regions))
	for i, r := range t.regions {
		out[i] = RegionStats{GPA: r.GPA, Size: r.Size}
	}
	// One read of smaps per arena (one for the regions from New, one per
	// hot-added region): the guard gaps keep every VMA within one region, so
	// each is attributed by its start address. The cost does not grow with
	// the guest's size (mincore's would).
	seen := map[*arena.Arena]bool{}
	for _, r := range t.regions {
		if seen[r.host] {
			continue
		}
		seen[r.host] = true
		st, err := r.host.Stats()
		if err != nil {
			return nil, err
		}
		for _, v := range st.VMAs {
			i := sort.Search(len(t.regions), func(i int) bool {
				r := t.regions[i]
				return r.HostAddr+uintptr(r.Size) > v.Start
			})
			if i == len(t.regions) || v.Start < t.regions[i].HostAddr || t.regions[i].host != r.host {
				continue // a guard gap
			}
			out[i].Resident += uint64(v.Rss + v.Hugetlb)
			out[i].Locked += uint64(v.Locked)
			out[i].HugePages += uint64(v.HugePages)
		}
	}
	return out, nil
}
