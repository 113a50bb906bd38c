package guestmem

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/uffd"
)

// ErrRestoreFailed is wrapped by the errors of an on-demand restore whose
// source failed (a read error, a checksum mismatch, a truncated or corrupt
// record) or that was cancelled: by OnDemand.Err and Wait, and by every
// host access to guest memory whose data was lost with it.
var ErrRestoreFailed = errors.New("on-demand restore failed")

// ErrRestoring is returned by AddRegion and RemoveRegion while an on-demand
// restore is still filling guest memory: the region table is fixed until
// the memory is fully resident (OnDemand.Wait).
var ErrRestoring = errors.New("on-demand restore in progress")

// ReaderAtContext is an io.ReaderAt that can be cancelled. A source's reads
// run while the restore holds the unit being filled: they must not touch
// the Memory being restored (what would wait returns ErrReentered). RestoreOnDemand
// uses ReadAtContext when a source has it, so a cancelled restore (or Close)
// does not wait for a slow read — a network fetch — to finish.
type ReaderAtContext interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// OnDemandOptions tunes RestoreOnDemand.
type OnDemandOptions struct {
	// Handlers is the number of goroutines serving page faults (default 4).
	// Each one serves a fault at a time, and a fault whose data is not yet
	// fetched waits for the source, so more handlers mean more fetches in
	// flight for a slow source.
	Handlers int
	// Fillers is the number of background goroutines copying in the rest of
	// the snapshot (default 2; the working set first, then address order).
	// Negative: none, so pages arrive only when touched, until Fill is
	// called (a working-set recording run wants this).
	Fillers int
	// WorkingSet, if not nil, is fetched first, in its order, ahead of the
	// guest's faults. It must have been recorded on a restore of the same
	// snapshot (ErrBadOption otherwise).
	WorkingSet *WorkingSet
	// Record bounds how long after the restore faults are recorded into
	// the working set (OnDemand.WorkingSet); 0 records until the memory is
	// fully resident.
	Record time.Duration
	// OnFailure, if set, is called once, on a goroutine of its own, when the
	// restore fails: the source failed, or ctx was cancelled. A VMM stops
	// its vCPUs there (see "On-demand restore" in docs/guestmem.md for what
	// a vCPU touching lost data sees).
	OnFailure func(error)
}

// OnDemandProgress describes an on-demand restore at a point in time.
type OnDemandProgress struct {
	DataBytes     uint64 // guest bytes the snapshot holds data for
	ResidentBytes uint64 // of those, filled so far
	Faults        uint64 // page faults on data the snapshot holds, served by the handlers
	FaultFetches  uint64 // of those, faults that had to read their data from the source
	ZeroFaults    uint64 // faults served with zeros: pages the snapshot holds none for, or discarded
	Prefetched    uint64 // bytes filled by the background fill (working set and the rest)
	HostFetched   uint64 // bytes filled for the host's own accesses (ReadAt, Save, ...)
	// FaultP50 and FaultP99 are the median and 99th percentile of the time a
	// handler took to serve a fault that fetched its data (from reading the
	// event to the wake), over the first 65536 such faults.
	FaultP50, FaultP99 time.Duration
	Done               bool  // fully resident: the userfaultfd is released
	Err                error // the restore failed (wraps ErrRestoreFailed)
}

// OnDemand is an on-demand restore in progress (RestoreOnDemand): guest
// memory filled from the snapshot as it is touched and in the background.
// Its methods are safe for concurrent use.
type OnDemand struct {
	m        *Memory
	u        *uffd.Userfaultfd
	srcs     []io.ReaderAt
	recs     []odRecord
	clusters []cluster // sorted by guest (and host) address
	regions  []region  // the memory's regions, fixed while restoring
	pageSize uint64
	id       [16]byte

	fillCtx    context.Context // cancelled on failure and Close: stops reads
	fillCancel context.CancelFunc
	serveStop  context.CancelFunc // stops the handlers
	stopAfter  func() bool        // unhooks ctx

	order []int32      // fill order: the working set, then address order
	next  atomic.Int64 // next index of order a filler takes

	remaining atomic.Int64 // clusters not yet filled
	dataBytes uint64
	resident  atomic.Uint64
	faults, fetches, zeroFaults,
	prefetched, hostFetched atomic.Uint64

	mu       sync.Mutex // lifecycle below, and the latencies
	phase    int        // running, done, failed, closed
	err      error
	done     chan struct{} // closed when fully resident, or failed and released
	latency  []time.Duration
	bufs     sync.Pool
	released atomic.Bool // the userfaultfd is gone
	failed   atomic.Bool // the restore failed: lost pages are fenced off
	workers  sync.WaitGroup
	onFail   func(error)

	// fetchFn, if set, fetches a cluster in place of the snapshot records
	// (post-copy: from the migration source).
	fetchFn  func(c *cluster, buf []byte, sub []bool) error
	postCopy bool

	wsLeft   atomic.Int64  // working-set clusters not yet filled
	wsDone   chan struct{} // closed when wsLeft reaches 0
	wsClosed sync.Once

	wsMu    sync.Mutex
	ws      []int32 // clusters in the order they were first faulted
	wsUntil time.Time
}

const (
	phaseRunning = iota
	phaseDone
	phaseFailed
	phaseClosed
)

// odRecord is a record of the chain, and the source it comes from.
type odRecord struct {
	entry
	src int
}

// A cluster is the unit of filling: an aligned block of fillUnit bytes (or
// of the page size, if larger) holding snapshot data, widened where a record
// of an older snapshot crosses its edge. It is fetched, checked and copied
// in whole, under mu; its state only moves from missing to done or failed.
type cluster struct {
	gpa     GuestAddress
	n       uint64
	host    uintptr
	idx     int32   // index in OnDemand.clusters
	region  int     // index in OnDemand.regions
	recs    []int32 // records touching it, in chain order
	mu      sync.Mutex
	state   atomic.Uint32
	holes   atomic.Bool // some pages are left without data (zero), or were discarded: they fault as zeros
	faulted atomic.Bool
	inWS    bool   // in the working set being prefetched
	removed []Span // discarded before it was filled (under mu): left zero
}

const (
	clusterMissing = iota
	clusterDone
	clusterFailed
)

// fillUnit is the size of a cluster: Save's record unit, so every record
// it writes lies in one cluster.
const fillUnit = recordUnit

// RestoreOnDemand builds guest memory from a snapshot chain (a snapshot and
// the increments on it, in one or more streams, as for Restore) read at
// offsets from sources — files, compressed snapshots, or any io.ReaderAt
// safe for concurrent use (a network fetcher: see ReaderAtContext) — and
// returns it before its data is read: the memory is created empty on its
// normal backing (WithAnonymous, the default; WithMemfd; WithHugetlb) and
// registered with a userfaultfd, and every page the guest (through KVM) or
// the host first touches is fetched from the snapshot, checked against its
// checksum and installed then, while background fillers copy in the rest.
// OnDemand reports progress, waits for "fully resident" (when the
// userfaultfd is released and the memory is like any other) and records the
// working set.
//
// Only the snapshot's header, index and checksum blocks are read during
// the call (two 4 KiB blocks per 127 records), and everything but the
// payload checksums is checked there, so a malformed chain is a
// *SnapshotError and no Memory. A payload that fails later — a read error,
// a checksum mismatch — fails the restore (see OnDemand): no page that had
// data is ever served as zeros, and nothing half-restored is reported as
// complete.
//
// ctx bounds the whole restore, not just this call: cancelling it before
// the memory is fully resident fails the restore. Closing the Memory stops
// it too, and leaves no goroutine, descriptor or mapping behind. While it
// runs, AddRegion and RemoveRegion return ErrRestoring, a full Save first
// fills the memory (so the snapshot it writes is complete), and Discard is
// honoured: a discarded page reads zeros, never snapshot data. opts are as
// for Restore; WithFile is refused (ErrBadOption).
func RestoreOnDemand(ctx context.Context, sources []io.ReaderAt, o OnDemandOptions, opts ...Option) (*Memory, *OnDemand, error) {
	const op = "RestoreOnDemand"
	if len(sources) == 0 {
		return nil, nil, fmt.Errorf("guestmem: %s: no snapshot: %w", op, ErrBadOption)
	}
	c := newConfig(opts)
	if err := c.check(op); err != nil {
		return nil, nil, err
	}
	if c.backing == File {
		return nil, nil, fmt.Errorf("guestmem: %s: %w: a File backing already holds guest memory; restore onto "+
			"anonymous, memfd or hugetlb memory", op, ErrBadOption)
	}
	if c.backing == GuestMemfd {
		return nil, nil, fmt.Errorf("guestmem: %s: %w: userfaultfd cannot register guest_memfd mappings "+
			"(UFFDIO_REGISTER is EINVAL in missing, minor and write-protect modes); use Restore, which reads "+
			"everything first", op, ErrGuestMemfdLimit)
	}
	od := &OnDemand{srcs: sources, done: make(chan struct{}), wsDone: make(chan struct{}), onFail: o.OnFailure}
	od.fillCtx, od.fillCancel = context.WithCancel(context.Background())
	layout, id, err := od.readIndex(ctx, c)
	if err != nil {
		od.fillCancel()
		return nil, nil, withOp(op, err)
	}
	if o.WorkingSet != nil && o.WorkingSet.Snapshot != id {
		od.fillCancel()
		return nil, nil, fmt.Errorf("guestmem: %s: %w: the working set was recorded on snapshot %x, not %x", op,
			ErrBadOption, o.WorkingSet.Snapshot[:4], id[:4])
	}
	m, err := newMemory(layout, c)
	if err != nil {
		od.fillCancel()
		return nil, nil, withOp(op, err)
	}
	od.m, od.id, od.pageSize = m, id, m.pageSize
	od.regions = slices.Clone(m.tab.Load().regions)
	od.plan()
	if err := od.start(o); err != nil {
		od.fillCancel()
		return nil, nil, errors.Join(fmt.Errorf("guestmem: %s: %w", op, err), m.Close())
	}
	m.snap = snapState{id: id, layout: layout}
	if od.remaining.Load() == 0 {
		od.finish()
	} else {
		m.od.Store(od)
	}
	od.stopAfter = context.AfterFunc(ctx, func() {
		od.fail(fmt.Errorf("guestmem: %s: %w: %w", op, ErrRestoreFailed, context.Cause(ctx)))
	})
	return m, od, nil
}

// sourceAt is source i of od as an io.ReaderAt that stops when the restore
// does, for the snapshot reader.
type sourceAt struct {
	od *OnDemand
	i  int
}

func (s sourceAt) ReadAt(p []byte, off int64) (int, error) {
	if err := s.od.fillCtx.Err(); err != nil {
		return 0, err
	}
	if rc, ok := s.od.srcs[s.i].(ReaderAtContext); ok {
		return rc.ReadAtContext(s.od.fillCtx, p, off)
	}
	return s.od.srcs[s.i].ReadAt(p, off)
}

// readIndex reads the headers, index and checksum blocks of every source,
// checking the chain, and collects its records.
func (od *OnDemand) readIndex(ctx context.Context, c config) (Layout, [16]byte, error) {
	var prev *SnapshotInfo
	index := 0
	for i := range od.srcs {
		sr := &snapReader{r: io.NewSectionReader(sourceAt{od, i}, 0, math.MaxInt64), stream: i, index: index}
		for {
			more, err := sr.nextPart(c.top)
			if err != nil {
				return nil, [16]byte{}, err
			}
			if !more {
				break
			}
			if err := chainCheck(sr.index, prev, sr); err != nil {
				return nil, [16]byte{}, err
			}
			if err := c.expectLayout(sr); err != nil {
				return nil, [16]byte{}, err
			}
			if err := sr.index1(ctx, func(entries []entry) {
				for _, e := range entries {
					od.recs = append(od.recs, odRecord{entry: e, src: i})
				}
			}); err != nil {
				return nil, [16]byte{}, err
			}
			info := sr.info
			prev = &info
		}
		index = sr.index + 1
	}
	return prev.Layout, prev.ID, nil
}

// plan groups the records into clusters.
func (od *OnDemand) plan() {
	unit := max(uint64(fillUnit), od.pageSize)
	// Data records, by address: each claims the aligned blocks it touches,
	// clipped to its region; overlapping claims merge.
	idx := make([]int32, 0, len(od.recs))
	for i, r := range od.recs {
		if r.kind != kindZero {
			idx = append(idx, int32(i))
		}
	}
	slices.SortStableFunc(idx, func(a, b int32) int { return cmpAddr(od.recs[a].gpa, od.recs[b].gpa) })
	for _, i := range idx {
		r := od.recs[i]
		ri := od.regionOf(r.gpa)
		reg := od.regions[ri]
		lo := max(reg.GPA, GuestAddress(uint64(r.gpa)/unit*unit))
		hi := min(reg.End(), GuestAddress(alignUp(uint64(r.gpa)+r.n, unit)))
		if k := len(od.clusters); k > 0 && od.clusters[k-1].region == ri && od.clusters[k-1].gpa+GuestAddress(od.clusters[k-1].n) > lo {
			last := &od.clusters[k-1]
			if end := last.gpa + GuestAddress(last.n); hi > end {
				last.n = uint64(hi - last.gpa)
			}
			continue
		}
		od.clusters = append(od.clusters, cluster{gpa: lo, n: uint64(hi - lo), region: ri,
			host: reg.HostAddr + uintptr(lo-reg.GPA)})
	}
	// Every record, data or zero, joins the clusters it overlaps, in chain
	// order (records are in chain order already).
	for i, r := range od.recs {
		j := sort.Search(len(od.clusters), func(j int) bool {
			c := &od.clusters[j]
			return c.gpa+GuestAddress(c.n) > r.gpa
		})
		for ; j < len(od.clusters) && od.clusters[j].gpa < r.gpa+GuestAddress(r.n); j++ {
			od.clusters[j].recs = append(od.clusters[j].recs, int32(i))
		}
	}
	for i := range od.clusters {
		od.clusters[i].idx = int32(i)
		od.dataBytes += od.clusters[i].n
	}
	od.remaining.Store(int64(len(od.clusters)))
}

// regionOf returns the index of the region holding a, which the snapshot
// reader has checked lies in guest RAM.
func (od *OnDemand) regionOf(a GuestAddress) int {
	return sort.Search(len(od.regions), func(i int) bool { return od.regions[i].End() > a })
}

// clusterAt returns the cluster holding host address addr, or nil.
func (od *OnDemand) clusterAt(addr uintptr) *cluster {
	j := sort.Search(len(od.clusters), func(j int) bool {
		c := &od.clusters[j]
		return c.host+uintptr(c.n) > addr
	})
	if j < len(od.clusters) && od.clusters[j].host <= addr {
		return &od.clusters[j]
	}
	return nil
}

// start opens and registers the userfaultfd and starts the handlers and
// fillers.
func (od *OnDemand) start(o OnDemandOptions) error {
	// ZeroFill, not Poison: the faults the fallback resolves are those of
	// pages without data (a handler's zero fill that failed) and those
	// still waiting when the memory is closed, whose data clusters are
	// fenced off first. Poison would raise SIGBUS in a vCPU thread, which a
	// Go program cannot survive while the thread is in KVM_RUN.
	cfg := uffd.Config{Fallback: uffd.ZeroFill}
	switch od.m.backing {
	case Memfd:
		cfg.Required = uffd.FeatureMissingShmem
	case Hugetlb:
		cfg.Required = uffd.FeatureMissingHugetlbfs
	}
	u, err := uffd.Open(cfg)
	if err != nil {
		return err
	}
	od.u = u
	for _, r := range od.regions {
		if _, err := u.Register(r.HostAddr, uintptr(r.Size)); err != nil {
			return errors.Join(err, u.Close())
		}
	}
	if o.Record > 0 {
		od.wsUntil = time.Now().Add(o.Record)
	}
	od.fillOrder(o.WorkingSet)
	handlers := o.Handlers
	if handlers <= 0 {
		handlers = 4
	}
	serveCtx, stop := context.WithCancel(context.Background())
	od.serveStop = stop
	for range handlers {
		od.workers.Add(1)
		go func() {
			defer od.workers.Done()
			_ = u.Serve(serveCtx, od.handle) // ends with the restore; a failure is the restore's to report
		}()
	}
	fillers := o.Fillers
	if fillers == 0 {
		fillers = 2
	}
	for range max(fillers, 0) {
		od.workers.Add(1)
		go func() {
			defer od.workers.Done()
			od.fillLoop()
		}()
	}
	return nil
}

// fillOrder is the working set's clusters in its order, then the rest in
// address order.
func (od *OnDemand) fillOrder(ws *WorkingSet) {
	seen := make([]bool, len(od.clusters))
	od.order = make([]int32, 0, len(od.clusters))
	if ws != nil {
		for _, s := range ws.Spans {
			j := sort.Search(len(od.clusters), func(j int) bool {
				c := &od.clusters[j]
				return c.gpa+GuestAddress(c.n) > s.GPA
			})
			for ; j < len(od.clusters) && od.clusters[j].gpa < s.GPA+GuestAddress(s.Size); j++ {
				if !seen[j] {
					seen[j] = true
					od.clusters[j].inWS = true
					od.order = append(od.order, int32(j))
				}
			}
		}
	}
	od.wsLeft.Store(int64(len(od.order)))
	if len(od.order) == 0 {
		od.wsClose()
	}
	for j := range od.clusters {
		if !seen[j] {
			od.order = append(od.order, int32(j))
		}
	}
}

func (od *OnDemand) wsClose() { od.wsClosed.Do(func() { close(od.wsDone) }) }

// WaitWorkingSet waits until every page of the working set given to
// RestoreOnDemand is filled (at once without one), as a VMM that resumes
// its vCPUs only then does (REAP): it returns nil, or the restore's error
// if it fails first, or ctx's.
func (od *OnDemand) WaitWorkingSet(ctx context.Context) error {
	select {
	case <-od.wsDone:
		return nil
	case <-od.done:
		if err := od.Err(); err != nil {
			return err
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fillLoop is a background filler: it takes clusters in fill order until
// none is left or the restore stops.
func (od *OnDemand) fillLoop() {
	for od.fillCtx.Err() == nil {
		i := od.next.Add(1) - 1
		if i >= int64(len(od.order)) {
			return
		}
		c := &od.clusters[od.order[i]]
		if c.state.Load() != clusterMissing {
			continue
		}
		c.mu.Lock()
		if c.state.Load() == clusterMissing {
			_, _ = od.fill(c, &od.prefetched) // a failure fails the restore
		}
		od.unlock(c)
	}
}

// unlock releases c and wakes its waiters: a fault whose handler found c
// locked by someone who did not fill it (Discard) must fault again.
func (od *OnDemand) unlock(c *cluster) {
	state := c.state.Load()
	c.mu.Unlock()
	if state == clusterMissing {
		_ = od.u.Wake(c.host, uintptr(c.n)) // nothing waits once the userfaultfd is gone
	}
}

// handle serves one userfaultfd event.
func (od *OnDemand) handle(ev uffd.Event) error {
	if ev.Kind != uffd.PageFault {
		return nil
	}
	start := time.Now()
	c := od.clusterAt(ev.Page)
	if c == nil {
		od.zeroFaults.Add(1)
		return od.zeroPage(ev)
	}
	od.faults.Add(1)
	od.noteFault(c)
	switch c.state.Load() {
	case clusterDone:
		// Filled already: the page holds no data (or was discarded since),
		// or this fault was read before the fill woke it.
		od.zeroFaults.Add(1)
		return od.zeroPage(ev)
	case clusterFailed:
		return od.wakePage(ev) // fenced off: the access fails when retried
	}
	if !c.mu.TryLock() {
		// Someone is filling it: their copy (or fence, or unlock) wakes
		// this fault. Not waiting here keeps every handler free to read the
		// events that filler may need read.
		return nil
	}
	fetched := false
	if c.state.Load() == clusterMissing {
		_, err := od.fill(c, nil)
		fetched = err == nil
	}
	state := c.state.Load()
	od.unlock(c)
	if state == clusterFailed {
		return od.wakePage(ev)
	}
	if fetched {
		od.noteLatency(time.Since(start))
	}
	return od.zeroPage(ev) // a page without data in c; ErrPresent (it has data) is success
}

func (od *OnDemand) zeroPage(ev uffd.Event) error {
	_, err := od.u.ZeroPage(ev.Page, ev.PageSize, uffd.WakeWaiters)
	if errors.Is(err, uffd.ErrPresent) {
		return nil
	}
	return err
}

func (od *OnDemand) wakePage(ev uffd.Event) error { return od.u.Wake(ev.Page, ev.PageSize) }

// noteFault records c's first fault in the working set.
func (od *OnDemand) noteFault(c *cluster) {
	if c.faulted.Load() || c.faulted.Swap(true) {
		return
	}
	if !od.wsUntil.IsZero() && time.Now().After(od.wsUntil) {
		return
	}
	od.wsMu.Lock()
	od.ws = append(od.ws, c.idx)
	od.wsMu.Unlock()
}

func (od *OnDemand) noteLatency(d time.Duration) {
	od.mu.Lock()
	if len(od.latency) < 1<<16 {
		od.latency = append(od.latency, d)
	}
	od.mu.Unlock()
}

// fill fetches c's records, checks them, and installs its pages: the caller
// holds c.mu and has seen c missing. It returns the data bytes installed. On
// failure the restore fails and c is fenced off (see lost).
//
// bytes, if not nil, counts the data bytes installed; nil counts a fault
// that fetched. Either is counted before the waiters are woken, so what
// they see next in Progress includes it.
func (od *OnDemand) fill(c *cluster, bytes *atomic.Uint64) (uint64, error) {
	if err := od.fillCtx.Err(); err != nil {
		return 0, od.lost(c, fmt.Errorf("%w: %w", ErrRestoreFailed, od.cause(err)))
	}
	buf := od.buffer(c.n)
	defer od.bufs.Put(&buf)
	sub := make([]bool, c.n/dirtyPage) // which 4 KiB pages hold data
	fetch := od.fetch
	if od.fetchFn != nil {
		fetch = od.fetchFn
	}
	// The source's ReadAt runs holding c (and, for a host access, the
	// region table): a call from it that would wait for the table fails
	// with ErrReentered rather than deadlocking.
	if od.m != nil {
		od.m.inCallback.Enter(od.op())
	}
	err := fetch(c, buf, sub)
	if od.m != nil {
		od.m.inCallback.Leave()
	}
	if err != nil {
		err = fmt.Errorf("guestmem: %s: %w: guest memory [%v, +%#x): %w", od.op(), ErrRestoreFailed, c.gpa, c.n, err)
		od.fail(err)
		return 0, od.lost(c, err)
	}
	for _, s := range c.removed { // page-aligned, as Discard requires
		clear(sub[uint64(s.GPA-c.gpa)/dirtyPage : uint64(s.GPA-c.gpa+GuestAddress(s.Size))/dirtyPage])
	}
	// A page (a huge one on hugetlb) is copied in if any of it holds data.
	ps := od.pageSize
	k := int(ps / dirtyPage)
	data := make([]bool, c.n/ps)
	for p := range data {
		data[p] = slices.Contains(sub[p*k:(p+1)*k], true)
	}
	var n uint64
	for p := 0; p < len(data); {
		if !data[p] {
			c.holes.Store(true)
			p++
			continue
		}
		q := p + 1
		for q < len(data) && data[q] {
			q++
		}
		off, k := uint64(p)*ps, uint64(q-p)*ps
		if err := od.install(c.host+uintptr(off), buf[off:off+k]); err != nil {
			err = fmt.Errorf("guestmem: RestoreOnDemand: installing guest memory [%v, +%#x): %w", c.gpa+GuestAddress(off), k, err)
			od.fail(err)
			return n, od.lost(c, err)
		}
		n += k
		p = q
	}
	c.state.Store(clusterDone)
	od.resident.Add(c.n)
	if bytes != nil {
		bytes.Add(n)
	} else {
		od.fetches.Add(1)
	}
	if c.inWS && od.wsLeft.Add(-1) == 0 {
		od.wsClose()
	}
	_ = od.u.Wake(c.host, uintptr(c.n)) // the faults waiting on its pages, data or not
	if od.remaining.Add(-1) == 0 {
		go od.finish()
	}
	return n, nil
}

// install copies p in at addr, without waking: fill wakes the whole cluster
// once. A page found present (none should be) is left as it is.
func (od *OnDemand) install(addr uintptr, p []byte) error {
	for len(p) > 0 {
		k, err := od.u.Copy(addr, p, uffd.DontWake)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, uffd.ErrPresent):
			k += int(od.pageSize)
		case errors.Is(err, uffd.ErrAgain):
			time.Sleep(10 * time.Microsecond)
		default:
			return err
		}
		k = min(k, len(p))
		addr += uintptr(k)
		p = p[k:]
	}
	return nil
}

// lost marks c failed and fences it off, returning err: its pages (the ones
// without data too, a conservative choice) become PROT_NONE, and the faults
// waiting on them are woken to retry and fail. A lost page is never served,
// as zeros or otherwise: the kernel's accesses (a vCPU's, through KVM, and
// system calls) fail with EFAULT — KVM_RUN reports a memory fault — and
// guestmem's accessors return ErrRestoreFailed without touching it. (Not
// UFFDIO_POISON: KVM turns a poisoned page into SIGBUS for the vCPU thread,
// which kills a Go process.)
func (od *OnDemand) lost(c *cluster, err error) error {
	if c.state.Load() == clusterMissing {
		c.state.Store(clusterFailed)
		od.fence(c)
	}
	return err
}

// fence makes c inaccessible and wakes its waiters.
func (od *OnDemand) fence(c *cluster) {
	if _, _, e := unix.Syscall(unix.SYS_MPROTECT, c.host, uintptr(c.n), unix.PROT_NONE); e != 0 {
		// Cannot happen for a range of our own mapping short of running out
		// of memory areas (vm.max_map_count): then fence the whole region,
		// which splits nothing.
		r := od.regions[c.region]
		_, _, _ = unix.Syscall(unix.SYS_MPROTECT, r.HostAddr, uintptr(r.Size), unix.PROT_NONE)
	}
	_ = od.u.Wake(c.host, uintptr(c.n)) // nothing waits once the userfaultfd is gone
}

func (od *OnDemand) cause(err error) error {
	od.mu.Lock()
	defer od.mu.Unlock()
	if od.err != nil {
		return od.err
	}
	return err
}

func (od *OnDemand) buffer(n uint64) []byte {
	if p, ok := od.bufs.Get().(*[]byte); ok && uint64(cap(*p)) >= n {
		b := (*p)[:n]
		clear(b)
		return b
	}
	return make([]byte, n)
}

// op names the operation in errors.
func (od *OnDemand) op() string {
	if od.postCopy {
		return "ReceiveMigration (post-copy)"
	}
	return "RestoreOnDemand"
}

// fetch composes c's contents in buf — zeros, then each record in chain
// order — checking every data record against its checksum, and marks in
// data the pages that hold snapshot data.
func (od *OnDemand) fetch(c *cluster, buf []byte, data []bool) error {
	const ps = dirtyPage
	for _, i := range c.recs {
		r := &od.recs[i]
		// The part of the record inside c (all of a data record).
		lo, hi := max(r.gpa, c.gpa), min(r.gpa+GuestAddress(r.n), c.gpa+GuestAddress(c.n))
		off, end := uint64(lo-c.gpa), uint64(hi-c.gpa)
		mark := r.kind != kindZero
		if r.kind == kindZero {
			clear(buf[off:end])
		} else if err := od.read(r, buf[off:end]); err != nil {
			return err
		}
		for p := off / ps; p < (end+ps-1)/ps; p++ {
			data[p] = mark
		}
	}
	return nil
}

// read reads data record r into p (len r.n) and checks its checksum.
func (od *OnDemand) read(r *odRecord, p []byte) error {
	src := sourceAt{od, r.src}
	if r.kind == kindZstd {
		sr := &snapReader{r: io.NewSectionReader(src, r.at, r.plen), stream: r.src, index: r.part, off: r.at}
		crc, err := sr.inflate(r.entry, func(off uint64, b []byte) error {
			copy(p[off:], b)
			return nil
		})
		if err == nil && crc != r.crc {
			err = sr.fail(r.at, fmt.Errorf("%w: data of [%v, +%#x): crc %#x, stored %#x", ErrSnapshotChecksum, r.gpa,
				r.n, crc, r.crc))
		}
		return err
	}
	n, err := io.ReadFull(io.NewSectionReader(src, r.at, int64(r.n)), p)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = fmt.Errorf("%w: source %d ends inside the data of [%v, +%#x)", ErrSnapshotTruncated, r.src, r.gpa, r.n)
		}
		return &SnapshotError{Op: "RestoreOnDemand", Stream: r.src, Index: r.part, Offset: r.at + int64(n), Err: err}
	}
	if crc := crc32.Checksum(p, castagnoli); crc != r.crc {
		return &SnapshotError{Op: "RestoreOnDemand", Stream: r.src, Index: r.part, Offset: r.at,
			Err: fmt.Errorf("%w: data of [%v, +%#x): crc %#x, stored %#x", ErrSnapshotChecksum, r.gpa, r.n, crc, r.crc)}
	}
	return nil
}

// fail fails the restore with err (the first failure wins): reads stop,
// every cluster not yet filled is fenced off (see lost), and the
// userfaultfd is then released: the memory behaves as any other, its lost
// pages inaccessible.
func (od *OnDemand) fail(err error) {
	od.mu.Lock()
	if od.phase != phaseRunning {
		od.mu.Unlock()
		return
	}
	od.phase, od.err = phaseFailed, err
	od.failed.Store(true)
	od.mu.Unlock()
	od.fillCancel()
	if od.onFail != nil {
		go od.onFail(err)
	}
	go od.fenceRest(phaseFailed)
}

// fenceRest fences off every cluster not filled, then, if the restore is
// still in phase from, releases the userfaultfd.
func (od *OnDemand) fenceRest(from int) {
	for i := range od.clusters {
		c := &od.clusters[i]
		if c.state.Load() != clusterMissing {
			continue
		}
		c.mu.Lock()
		if c.state.Load() == clusterMissing {
			c.state.Store(clusterFailed)
			od.fence(c)
		}
		c.mu.Unlock()
	}
	if from >= 0 {
		od.release(from)
	}
}

// finish releases the userfaultfd once every cluster is filled.
func (od *OnDemand) finish() { od.release(phaseRunning) }

// release unregisters guest memory, closes the userfaultfd and stops the
// handlers, if the restore is still in phase from: the pages left missing
// (without data, or discarded) take the normal fault path, as zeros.
func (od *OnDemand) release(from int) {
	od.mu.Lock()
	defer od.mu.Unlock()
	if od.phase != from || od.released.Load() {
		return
	}
	if from == phaseRunning {
		od.phase = phaseDone
	}
	od.releaseLocked()
}

func (od *OnDemand) releaseLocked() {
	var errs []error
	for _, r := range od.regions {
		if err := od.u.Unregister(r.HostAddr, uintptr(r.Size)); err != nil && !errors.Is(err, fs.ErrClosed) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, od.u.Close())
	od.serveStop()
	od.released.Store(true)
	if m := od.m; m != nil && od.phase == phaseDone {
		m.od.CompareAndSwap(od, nil) // a failed restore stays, to name the lost pages
	}
	if err := errors.Join(errs...); err != nil && od.err == nil && od.phase != phaseClosed {
		od.err = fmt.Errorf("guestmem: RestoreOnDemand: releasing the userfaultfd: %w", err)
	}
	select {
	case <-od.done:
	default:
		close(od.done)
	}
}

// close stops the restore for Memory.Close: reads are cancelled, clusters
// not filled are fenced off (so no fault still waiting is resolved with
// zeros), the userfaultfd is closed, and the handlers and fillers are
// waited for.
func (od *OnDemand) close() {
	od.mu.Lock()
	if od.phase == phaseRunning {
		od.phase, od.err = phaseClosed, fmt.Errorf("guestmem: RestoreOnDemand: %w: the memory was closed: %w",
			ErrRestoreFailed, ErrClosed)
	}
	od.mu.Unlock()
	od.fillCancel()
	if !od.released.Load() {
		od.fenceRest(-1)
	}
	od.mu.Lock()
	if !od.released.Load() {
		// The memory is about to be unmapped: nothing is lost by closing
		// with ranges registered.
		_ = od.u.Close()
		od.serveStop()
		od.released.Store(true)
		select {
		case <-od.done:
		default:
			close(od.done)
		}
	}
	od.mu.Unlock()
	if od.stopAfter != nil {
		od.stopAfter()
	}
	od.workers.Wait()
}

// Wait waits until guest memory is fully resident — every page the snapshot
// holds data for is filled, and the userfaultfd released — and returns nil;
// or returns the restore's error (wrapping ErrRestoreFailed) once it has
// failed, or ctx's error if ctx is done first.
func (od *OnDemand) Wait(ctx context.Context) error {
	select {
	case <-od.done:
		return od.Err()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Done is closed when the restore ends: fully resident, or failed.
func (od *OnDemand) Done() <-chan struct{} { return od.done }

// Err returns the restore's error once it has failed, else nil.
func (od *OnDemand) Err() error {
	od.mu.Lock()
	defer od.mu.Unlock()
	return od.err
}

// Fill fills every page still missing now, from the calling goroutine (the
// fillers, if any, keep going too), and returns once every one is filled
// or the restore has failed (its error), or ctx is done. Save calls it.
func (od *OnDemand) Fill(ctx context.Context) error {
	for i := range od.clusters {
		if err := ctx.Err(); err != nil {
			return err
		}
		c := &od.clusters[i]
		if c.state.Load() == clusterDone {
			continue
		}
		c.mu.Lock()
		if c.state.Load() == clusterMissing {
			_, _ = od.fill(c, &od.hostFetched)
		}
		state := c.state.Load()
		od.unlock(c)
		if state == clusterFailed {
			return od.failure()
		}
	}
	return nil
}

// failure is the restore's error, which a failed cluster implies.
func (od *OnDemand) failure() error {
	if err := od.Err(); err != nil {
		return err
	}
	return ErrRestoreFailed
}

// Progress reports how far the restore is.
func (od *OnDemand) Progress() OnDemandProgress {
	p := OnDemandProgress{
		DataBytes: od.dataBytes, ResidentBytes: od.resident.Load(), Faults: od.faults.Load(),
		FaultFetches: od.fetches.Load(), ZeroFaults: od.zeroFaults.Load(), Prefetched: od.prefetched.Load(),
		HostFetched: od.hostFetched.Load(),
	}
	od.mu.Lock()
	lat := slices.Clone(od.latency)
	p.Done, p.Err = od.phase == phaseDone && od.released.Load(), od.err
	od.mu.Unlock()
	if len(lat) > 0 {
		slices.Sort(lat)
		p.FaultP50 = lat[len(lat)/2]
		p.FaultP99 = lat[min(len(lat)-1, len(lat)*99/100)]
	}
	return p
}

// WorkingSet returns the working set recorded so far: the guest ranges
// first faulted, in the order of their first fault (OnDemandOptions.Record
// bounds the window). Pass it to the next restore of the same snapshot.
func (od *OnDemand) WorkingSet() *WorkingSet {
	od.wsMu.Lock()
	defer od.wsMu.Unlock()
	ws := &WorkingSet{Snapshot: od.id, Spans: make([]Span, len(od.ws))}
	for i, j := range od.ws {
		c := &od.clusters[j]
		ws.Spans[i] = Span{GPA: c.gpa, Size: c.n}
	}
	return ws
}

// ensure makes guest memory [a, a+n) present before the host touches it
// with Go code, which must never wait on a userfault (see internal/uffd): it
// fills the clusters it overlaps that are missing, and has the kernel fault
// in (MADV_POPULATE) the pages that hold no data. A range whose data was
// lost is an error wrapping ErrRestoreFailed.
func (od *OnDemand) ensure(op string, a GuestAddress, n uint64, write bool) error {
	if od.released.Load() && !od.failed.Load() {
		return nil
	}
	end := a + GuestAddress(n)
	j := sort.Search(len(od.clusters), func(j int) bool {
		c := &od.clusters[j]
		return c.gpa+GuestAddress(c.n) > a
	})
	pos := a
	for pos < end {
		var c *cluster
		if j < len(od.clusters) && od.clusters[j].gpa < end {
			c = &od.clusters[j]
		}
		// pages before c (or to end) hold no data
		gapEnd := end
		if c != nil {
			gapEnd = max(pos, c.gpa)
		}
		if pos < gapEnd {
			if err := od.populate(op, pos, uint64(gapEnd-pos), write); err != nil {
				return err
			}
			pos = gapEnd
		}
		if c == nil {
			break
		}
		cEnd := min(end, c.gpa+GuestAddress(c.n))
		if c.state.Load() == clusterMissing {
			c.mu.Lock()
			if c.state.Load() == clusterMissing {
				_, _ = od.fill(c, &od.hostFetched)
			}
			od.unlock(c)
		}
		switch {
		case c.state.Load() == clusterFailed:
			return &AddressError{Op: op, GPA: pos, Len: n, Err: od.failure()}
		case c.holes.Load():
			if err := od.populate(op, pos, uint64(cEnd-pos), write); err != nil {
				return err
			}
		}
		pos = cEnd
		j++
	}
	return nil
}

// populate has the kernel fault in [a, a+n) (page-aligned outward), so the
// handlers serve it while the host thread waits in a system call.
func (od *OnDemand) populate(op string, a GuestAddress, n uint64, write bool) error {
	if od.released.Load() {
		return nil // no userfaults left: an ordinary fault is fine
	}
	lo := GuestAddress(uint64(a) / od.pageSize * od.pageSize)
	hi := GuestAddress(alignUp(uint64(a)+n, od.pageSize))
	r := od.regions[od.regionOf(lo)]
	mode := arena.PopulateRead
	if write {
		mode = arena.PopulateWrite
	}
	err := r.host.Populate(r.arenaOff+int64(lo-r.GPA), int64(hi-lo), mode)
	if err != nil && !od.released.Load() {
		return &AddressError{Op: op, GPA: a, Len: n, Err: err}
	}
	return nil
}

// discard runs do, Discard's work on [a, a+n), with the clusters it
// overlaps locked: a cluster not yet filled records the range, and its fill
// leaves those pages zero; a filled one is marked as having holes.
func (od *OnDemand) discard(a GuestAddress, n uint64, do func() error) error {
	end := a + GuestAddress(n)
	j := sort.Search(len(od.clusters), func(j int) bool {
		c := &od.clusters[j]
		return c.gpa+GuestAddress(c.n) > a
	})
	var locked []*cluster
	for ; j < len(od.clusters) && od.clusters[j].gpa < end; j++ {
		c := &od.clusters[j]
		c.mu.Lock()
		locked = append(locked, c)
		lo, hi := max(a, c.gpa), min(end, c.gpa+GuestAddress(c.n))
		switch c.state.Load() {
		case clusterMissing:
			c.removed = append(c.removed, Span{GPA: lo, Size: uint64(hi - lo)})
		case clusterDone:
			c.holes.Store(true)
		}
	}
	err := do()
	for _, c := range locked {
		od.unlock(c)
	}
	return err
}

// restoring returns the on-demand restore still filling m, or that failed
// to, or nil.
func (m *Memory) restoring() *OnDemand {
	od := m.od.Load()
	if od == nil || od.released.Load() && !od.failed.Load() {
		return nil
	}
	return od
}

// ensure is OnDemand.ensure for m, a no-op unless a restore is filling it.
func (m *Memory) ensure(op string, a GuestAddress, n uint64, write bool) error {
	if od := m.od.Load(); od != nil {
		return od.ensure(op, a, n, write)
	}
	return nil
}
