//go:build amd64

// Package bench is the harness of `gmem bench`: it times the setup of
// guest RAM phase by phase (guestmem.New, KVM registration, a prefault
// strategy, teardown, and a vCPU's first touch) over a matrix of sizes,
// backings and strategies, and measures peers on the same sizes in the
// same run (direct madvise, memset, QEMU's preallocation, gokvm's
// machine.New). Each figure is the median of its measured runs, with their
// spread and the cold first run apart. The Report is written as a table,
// JSON, CSV or a chart.
//
// The flags and their checks stay in cmd/gmem; New trusts its Config to
// hold names among StrategyNames, BackingNames and PeerNames. The method
// is in docs/gmem.md.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/units"
	"github.com/gmem-vmm/gmem/kvm"
)

// Strategy names.
const (
	StrategyNone        = "none"
	StrategyMapPopulate = "map-populate"
	StrategyPrefault1   = "prefault-1"
	StrategyPrefaultN   = "prefault-n"
	StrategyTouch       = "touch"
)

// StrategyNames are the prefault strategies, in the order they are measured.
var StrategyNames = []string{StrategyNone, StrategyMapPopulate, StrategyPrefault1, StrategyPrefaultN, StrategyTouch}

// Peer names.
const (
	PeerMadvise = "madvise"
	PeerMemset  = "memset"
	PeerQEMU    = "qemu"
	PeerGokvm   = "gokvm"
)

// PeerNames are the peers, in the order they are measured.
var PeerNames = []string{PeerMadvise, PeerMemset, PeerQEMU, PeerGokvm}

// Config is what to measure: the flags of gmem bench, checked on their
// own and normalized (names lower-cased and without repeats, Workers
// resolved).
type Config struct {
	Sizes      []units.Size // multiples of 2 MiB
	Strategies []string     // among StrategyNames
	Backings   []string     // among BackingNames
	Peers      []string     // among PeerNames; none for none
	// ExplicitBackings and ExplicitPeers make a backing or peer the host
	// cannot provide (a hugetlb pool too small, no QEMU, no KVM) an error;
	// otherwise it is skipped with a note.
	ExplicitBackings, ExplicitPeers bool
	Workers                         int    // threads of prefault-n and of the parallel peers, at least 1
	Runs, Warmup                    int    // measured runs per figure (at least 1), and runs before them
	HugepageSize                    uint64 // page size of the hugetlb backing
	// QEMU is the QEMU binary, which must exist; "" is qemu-system-x86_64
	// on PATH, and the peer is skipped without one (unless ExplicitPeers).
	QEMU       string
	KVMPath    string // the KVM device for registration and the gokvm peer
	GuestTouch string // "on", "off" or "auto" (guests up to 1 GiB): time a vCPU's first touch
	Root       fs.FS  // the host's root, for /proc and /sys
	Command    string // the command line, recorded in the report
	// Progress, if not nil, is called when a figure starts (runs 0) and as
	// its runs finish or are skipped (the number just accounted for), from
	// the goroutine that called Run.
	Progress func(runs int, figure string)
}

// Plan is a checked Config turned into figures, and the state of its run.
type Plan struct {
	jobs     []job
	report   *Report
	kvm      *kvm.Device // nil: no KVM registration
	runs     int
	warmup   int
	progress func(runs int, figure string)
	done     int // runs finished
	total    int // runs planned
	started  time.Time
	root     fs.FS
}

// job is one figure: a configuration timed warmup+runs times.
type job struct {
	size    units.Size
	backing string
	method  string
	peer    bool
	workers int
	// open prepares what the runs share and returns the function timing
	// one run and a function releasing what open made.
	open func(ctx context.Context) (func(ctx context.Context) (sample, error), func() error, error)
}

// sample is the timings of one run; a negative duration is a phase the
// method does not have.
type sample struct {
	mapT, register, prefault, teardown time.Duration
	guestTouch                         time.Duration // a vCPU writing every page, after the prefault
	huge, resident                     float64
	note                               string // about the method, for the result
}

const notApplicable = -1

// New checks cfg against the host and turns it into figures, before
// anything is allocated: it opens KVM (without it, registration is not
// measured and the gokvm peer is skipped), finds QEMU, and keeps hugetlb
// only for the sizes its pool holds. It does not check that a size fits
// in the host's memory. The Plan holds the KVM device until Close.
func New(cfg Config) (*Plan, error) {
	if cfg.Runs < 1 || cfg.Warmup < 0 || cfg.Workers < 1 {
		return nil, fmt.Errorf("bench: %d runs, %d warm-up, %d workers: need at least 1 run and 1 worker",
			cfg.Runs, cfg.Warmup, cfg.Workers)
	}
	peers := cfg.Peers
	rep := &Report{Command: cfg.Command, Started: time.Now().UTC(), Runs: cfg.Runs, Warmup: cfg.Warmup,
		Workers: cfg.Workers, Host: readHost(cfg.Root)}
	p := &Plan{report: rep, runs: cfg.Runs, warmup: cfg.Warmup, progress: cfg.Progress, started: time.Now(),
		root: cfg.Root}
	note := func(format string, args ...any) { rep.Notes = append(rep.Notes, fmt.Sprintf(format, args...)) }

	// KVM: slot registration and the gokvm peer need it.
	if d, err := kvm.Open(cfg.KVMPath); err == nil {
		p.kvm = d
	} else {
		if cfg.ExplicitPeers && slices.Contains(peers, PeerGokvm) {
			return nil, fmt.Errorf("peer gokvm needs KVM: %w", err)
		}
		note("KVM registration not measured, gokvm peer skipped: %v", err)
		peers = slices.DeleteFunc(slices.Clone(peers), func(p string) bool { return p == PeerGokvm })
	}
	fail := func(err error) (*Plan, error) {
		p.Close()
		return nil, err
	}

	// QEMU.
	qemu := ""
	if slices.Contains(peers, PeerQEMU) {
		var err error
		qemu, err = findQEMU(cfg.QEMU)
		if err != nil {
			if cfg.ExplicitPeers || cfg.QEMU != "" {
				return fail(err)
			}
			note("qemu peer skipped: %v", err)
			peers = slices.DeleteFunc(slices.Clone(peers), func(p string) bool { return p == PeerQEMU })
		} else {
			rep.Host.QEMU = qemuVersion(qemu)
		}
	}

	// Backings, per size: hugetlb needs a pool with enough free pages.
	pools := host.ReadHugePools(cfg.Root)
	type sizedBacking struct {
		size units.Size
		b    BackingChoice
	}
	var matrix []sizedBacking
	for _, s := range cfg.Sizes {
		for _, name := range cfg.Backings {
			bk, err := backingByName(name, cfg.HugepageSize)
			if err != nil {
				return fail(err)
			}
			if bk.Backing == guestmem.GuestMemfd {
				if err := gmemAvailable(p.kvm); err != nil {
					if cfg.ExplicitBackings {
						return fail(fmt.Errorf("backing gmem unavailable: %w", err))
					}
					note("gmem skipped at %v: %v", s, err)
					continue
				}
			}
			if bk.Backing == guestmem.Hugetlb {
				if err := pools.Check(bk.HugePage, uint64(s)); err != nil {
					if cfg.ExplicitBackings {
						return fail(fmt.Errorf("backing hugetlb unavailable for %v: %w", s, err))
					}
					note("hugetlb skipped at %v: %v", s, err)
					continue
				}
			}
			matrix = append(matrix, sizedBacking{s, bk})
		}
	}
	if p.kvm != nil {
		rep.Host.GoKVM = gokvmVersion()
	}

	// Jobs: for each size, gmem's strategies for each backing, then the
	// peers, so that each size's figures are measured close together.
	workers := cfg.Workers
	for _, s := range cfg.Sizes {
		for _, sb := range matrix {
			if sb.size != s {
				continue
			}
			for _, st := range cfg.Strategies {
				if st == StrategyMapPopulate && sb.b.Backing == guestmem.GuestMemfd {
					continue // MAP_POPULATE is a peer's method on a plain mapping, which guest_memfd is not
				}
				touch := p.kvm != nil && (st == StrategyNone || st == StrategyPrefaultN) &&
					(cfg.GuestTouch == "on" || cfg.GuestTouch == "auto" && s <= guestTouchAuto)
				p.jobs = append(p.jobs, gmemJob(s, sb.b, st, workers, p.kvm, touch))
			}
		}
		for _, sb := range matrix {
			if sb.size != s || sb.b.Backing == guestmem.GuestMemfd { // the peers map memory of their own
				continue
			}
			if slices.Contains(peers, PeerMadvise) {
				p.jobs = append(p.jobs, madviseJob(s, sb.b, 1))
				if workers > 1 {
					p.jobs = append(p.jobs, madviseJob(s, sb.b, workers))
				}
			}
			if slices.Contains(peers, PeerMemset) {
				p.jobs = append(p.jobs, memsetJob(s, sb.b, 1))
				if workers > 1 {
					p.jobs = append(p.jobs, memsetJob(s, sb.b, workers))
				}
			}
			if slices.Contains(peers, PeerQEMU) {
				if j, ok := qemuJob(qemu, s, sb.b, workers, p.kvm != nil); ok {
					p.jobs = append(p.jobs, j)
				}
			}
		}
		if slices.Contains(peers, PeerGokvm) {
			if s < GokvmMinSize { // named in --peers, the flags refused it
				note("gokvm skipped at %v: machine.New needs at least %v", s, GokvmMinSize)
			} else {
				p.jobs = append(p.jobs, gokvmJob(cfg.KVMPath, s))
			}
		}
	}
	if slices.Contains(peers, PeerQEMU) && !slices.Contains(cfg.Backings, BackingAnonTHP) &&
		!slices.Contains(cfg.Backings, BackingMemfd) && !slices.Contains(cfg.Backings, BackingHugetlb) {
		note("qemu peer: none of the chosen backings has a QEMU counterpart (anon-thp, memfd, hugetlb)")
	}
	if len(p.jobs) == 0 {
		return fail(errors.New("nothing to measure: every backing or peer asked for was skipped"))
	}
	p.total = len(p.jobs) * (cfg.Warmup + cfg.Runs)
	return p, nil
}

// Populates reports whether measuring strategies and peers populates guest
// RAM, and so needs the memory: a lazy guest (strategy none, no peer) does
// not, and may be larger than the host's available memory.
func Populates(strategies, peers []string) bool {
	return len(peers) > 0 || slices.ContainsFunc(strategies, func(s string) bool { return s != StrategyNone })
}

// Total returns the number of runs planned, warm-ups included.
func (p *Plan) Total() int { return p.total }

// Done returns the number of runs finished.
func (p *Plan) Done() int { return p.done }

// findQEMU returns the QEMU binary to use: path if given, else
// qemu-system-x86_64 on PATH.
func findQEMU(path string) (string, error) {
	if path == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return "", errors.New("no qemu-system-x86_64 on PATH (install QEMU or name a binary with --qemu)")
		}
		return p, nil
	}
	p, err := exec.LookPath(path)
	if err != nil {
		return "", fmt.Errorf("QEMU binary %s: %w", path, errors.Unwrap(err))
	}
	return p, nil
}

// Close releases the KVM device. Closing twice is harmless.
func (p *Plan) Close() {
	if p.kvm != nil {
		p.kvm.Close()
		p.kvm = nil
	}
}

// Run measures every figure in order, one at a time, releasing each
// figure's memory before the next. When ctx is cancelled it stops, and the
// report holds what was measured so far, with ctx's error. A peer that
// fails is a note in the report; a figure of gmem's own that fails is an
// error, after the others were measured.
func (p *Plan) Run(ctx context.Context) (*Report, error) {
	var errs []error
	for _, j := range p.jobs {
		if ctx.Err() != nil {
			break
		}
		res, err := p.runJob(ctx, j)
		if res != nil {
			p.report.Results = append(p.report.Results, *res)
		}
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		label := fmt.Sprintf("%v %s %s", j.size, j.backing, j.method)
		if j.peer {
			// A peer that fails is reported, not fatal: gmem's own figures stand.
			p.report.Notes = append(p.report.Notes, fmt.Sprintf("peer %s failed: %v", label, err))
			continue
		}
		errs = append(errs, fmt.Errorf("%s: %w", label, err))
	}
	p.report.Elapsed = time.Since(p.started).Round(time.Millisecond)
	p.report.Host.LoadEnd = loadAverage(p.root)
	if n := busyNote(p.report.Host); n != "" {
		p.report.Notes = append(p.report.Notes, n)
	}
	if err := ctx.Err(); err != nil {
		p.report.Interrupted = true
		p.report.Notes = append(p.report.Notes, fmt.Sprintf("interrupted after %d of %d runs", p.done, p.total))
		return p.report, err
	}
	return p.report, errors.Join(errs...)
}

// runJob times one job warmup+runs times and summarizes it.
func (p *Plan) runJob(ctx context.Context, j job) (res *Result, err error) {
	label := fmt.Sprintf("%v %s %s", j.size, j.backing, j.method)
	p.tell(0, label)
	once, release, err := j.open(ctx)
	if err != nil {
		p.tell(p.warmup+p.runs, label)
		return nil, err
	}
	defer func() { err = errors.Join(err, release()) }()
	var samples []sample
	n := p.warmup + p.runs
	for i := range n {
		if ctx.Err() != nil {
			p.tell(n-i, label)
			break
		}
		s, err := once(ctx)
		if err != nil {
			p.tell(n-i, label)
			if ctx.Err() != nil {
				break // what was measured before the interruption is kept
			}
			return nil, err
		}
		samples = append(samples, s)
		p.done++
		p.tell(1, label)
	}
	if len(samples) == 0 {
		return nil, ctx.Err()
	}
	r := summarizeJob(j, samples, p.warmup)
	if len(samples) < n {
		r.Note = strings.TrimPrefix(r.Note+"; ", "; ") + fmt.Sprintf("interrupted: %d of %d runs", len(samples), n)
	}
	return &r, ctx.Err()
}

// tell passes progress on: runs 0 when a figure starts, then the runs
// accounted for (done, or skipped so that a progress bar still ends full).
func (p *Plan) tell(runs int, figure string) {
	if p.progress != nil {
		p.progress(runs, figure)
	}
}

// summarizeJob turns the samples of a job into a Result.
func summarizeJob(j job, samples []sample, warmup int) Result {
	r := Result{Size: uint64(j.size), SizeText: j.size.String(), Backing: j.backing, Method: j.method, Peer: j.peer,
		Workers: j.workers}
	phase := func(get func(sample) time.Duration) *Summary {
		var d []time.Duration
		for _, s := range samples {
			v := get(s)
			if v < 0 {
				return nil
			}
			d = append(d, v)
		}
		s := summarize(d, warmup)
		return &s
	}
	r.Map = phase(func(s sample) time.Duration { return s.mapT })
	r.Register = phase(func(s sample) time.Duration { return s.register })
	r.Prefault = phase(func(s sample) time.Duration { return s.prefault })
	r.Teardown = phase(func(s sample) time.Duration { return s.teardown })
	r.GuestTouch = phase(func(s sample) time.Duration {
		if s.guestTouch == 0 {
			return notApplicable // not measured: a vCPU touching any memory takes time
		}
		return s.guestTouch
	})
	r.Setup = phase(func(s sample) time.Duration {
		return max(s.mapT, 0) + max(s.register, 0) + max(s.prefault, 0)
	})
	if r.Prefault != nil {
		r.GiBps = units.GiBPerSec(uint64(j.size), r.Prefault.Median)
	}
	last := samples[len(samples)-1]
	r.Huge, r.Resident, r.Note = last.huge, last.resident, last.note
	return r
}

// gmemAvailable says why the gmem backing cannot be measured, if it cannot:
// no KVM, or a guest_memfd the host cannot map (before Linux 6.18).
func gmemAvailable(d *kvm.Device) error {
	if d == nil {
		return errors.New("guest_memfd is made on a VM, and KVM is not available")
	}
	c, err := d.Capabilities()
	if err != nil {
		return err
	}
	const want = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared
	if !c.GuestMemfd || c.GuestMemfdFlags&want != want {
		return fmt.Errorf("this kernel's guest_memfd cannot be mapped by the host (flags %v; Linux 6.18 needed)",
			c.GuestMemfdFlags)
	}
	return nil
}
