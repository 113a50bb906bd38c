package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/units"
	"github.com/gmem-vmm/gmem/kvm"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// BenchCmd is `gmem bench`: time guest-memory setup, phase by phase, for a
// matrix of sizes, backings and prefault strategies, against peers measured
// in the same run.
type BenchCmd struct {
	Sizes        []Size   `default:"1G,4G" sep:"," placeholder:"SIZE" help:"Guest sizes, multiples of 2 MiB: 512M, 4G, 4GiB, 1T... (default: ${default})."`
	Backings     []string `sep:"," placeholder:"NAME" help:"Backings among anon, anon-thp, memfd, hugetlb. Default: all the host offers (hugetlb only with a big enough pool); one named here that the host lacks is an error."`
	Strategies   []string `default:"none,map-populate,prefault-1,prefault-n,touch" sep:"," placeholder:"NAME" help:"Prefault strategies among none, map-populate, prefault-1, prefault-n, touch (default: all)."`
	Peers        []string `sep:"," placeholder:"NAME" help:"Peers among madvise, memset, qemu, gokvm, or none. Default: all available (qemu needs a QEMU binary, gokvm needs KVM); one named here that is unavailable is an error."`
	Workers      int      `default:"0" placeholder:"N" help:"Workers of prefault-n and the parallel peers (default: the number of CPUs)."`
	Runs         int      `default:"5" placeholder:"N" help:"Measured runs per figure; the median and spread are over these (default: ${default})."`
	Warmup       int      `default:"1" placeholder:"N" help:"Runs before the measured ones, left out of the median. The very first run is reported as cold (default: ${default})."`
	HugepageSize Size     `name:"hugepage-size" default:"2M" placeholder:"SIZE" help:"Page size of the hugetlb backing, 2M or 1G (default: ${default})."`
	QEMU         string   `name:"qemu" placeholder:"PATH" help:"QEMU binary for the qemu peer (default: qemu-system-x86_64 on PATH)."`
	KVMPath      string   `name:"kvm" default:"/dev/kvm" placeholder:"PATH" help:"KVM device for slot registration and the gokvm peer (default: ${default})."`
	JSON         bool     `xor:"format" help:"Print the results as JSON instead of a table."`
	CSV          bool     `xor:"format" help:"Print the results as CSV instead of a table."`
	Plot         string   `placeholder:"FILE" help:"Also chart GiB/s per strategy, backing and peer to FILE (.svg or .png)."`
	NoProgress   bool     `help:"Never show the progress bar (it is shown only when stderr is a terminal)."`
	GuestTouch   string   `name:"guest-touch" default:"auto" enum:"auto,on,off" help:"Time a vCPU writing every page after strategies none and prefault-n (first touch without and with prefault): on, off, or auto (guests up to 1 GiB: guest code may run in KVM's instruction emulator, at about 0.2 million pages a second) (default: ${default})."`
}

// Strategy names.
const (
	stratNone        = "none"
	stratMapPopulate = "map-populate"
	stratPrefault1   = "prefault-1"
	stratPrefaultN   = "prefault-n"
	stratTouch       = "touch"
)

var allStrategies = []string{stratNone, stratMapPopulate, stratPrefault1, stratPrefaultN, stratTouch}

// Peer names.
const (
	peerMadvise = "madvise"
	peerMemset  = "memset"
	peerQEMU    = "qemu"
	peerGokvm   = "gokvm"
)

var allPeers = []string{peerMadvise, peerMemset, peerQEMU, peerGokvm}

// Run checks the flags and the host, runs the matrix, and prints it.
func (c *BenchCmd) Run(env *Env) error {
	b, err := c.plan(env)
	if err != nil {
		return err
	}
	defer b.close()
	rep, runErr := b.run(env.Ctx)
	if err := c.output(env.Stdout, rep); err != nil {
		return errors.Join(runErr, err)
	}
	if c.Plot != "" && len(rep.Results) > 0 {
		if err := writePlot(c.Plot, rep); err != nil {
			return errors.Join(runErr, err)
		}
	}
	if runErr != nil && env.Ctx.Err() != nil {
		return fmt.Errorf("%w: stopped after %d of %d runs; the results above are what was measured",
			errInterrupted, b.done, b.total)
	}
	return runErr
}

func (c *BenchCmd) output(w io.Writer, rep *Report) error {
	switch {
	case c.JSON:
		return writeJSON(w, rep)
	case c.CSV:
		return writeCSV(w, rep)
	}
	return writeTable(w, rep)
}

// bench is a checked plan and the state of its run.
type bench struct {
	jobs    []job
	report  *Report
	kvm     *kvm.Device // nil: no KVM registration
	runs    int
	warmup  int
	bar     *progressbar.ProgressBar
	done    int // runs finished
	total   int // runs planned
	started time.Time
	root    fs.FS
}

// job is one figure: a configuration timed warmup+runs times.
type job struct {
	size    Size
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

// benchFlags are the flags of a BenchCmd, checked and normalized: names
// lower-cased and deduplicated, workers resolved.
type benchFlags struct {
	workers          int
	sizes            []Size
	strategies       []string
	backings         []string // all of them unless named
	peers            []string // all of them unless named; none for "none"
	explicitBackings bool
	explicitPeers    bool
}

// Validate checks the flags on their own, before the host is looked at:
// kong calls it while parsing, so a bad value exits 2.
func (c *BenchCmd) Validate() error {
	_, err := c.flags()
	return err
}

// flags checks the flags on their own (not against the host) and
// normalizes them.
func (c *BenchCmd) flags() (benchFlags, error) {
	var f benchFlags
	if c.Runs < 1 {
		return f, fmt.Errorf("--runs %d: at least 1 run is needed", c.Runs)
	}
	if c.Warmup < 0 {
		return f, fmt.Errorf("--warmup %d: must not be negative", c.Warmup)
	}
	f.workers = c.Workers
	if f.workers < 0 {
		return f, fmt.Errorf("--workers %d: must not be negative (0 is one per CPU)", f.workers)
	}
	if f.workers == 0 {
		f.workers = runtime.NumCPU()
	}
	if c.Plot != "" {
		switch strings.ToLower(filepath.Ext(c.Plot)) {
		case ".svg", ".png":
		default:
			return f, fmt.Errorf("--plot %s: the chart is written as .svg or .png, by the file's extension", c.Plot)
		}
	}
	if len(c.Sizes) == 0 {
		return f, errors.New("--sizes: no size given")
	}
	if c.GuestTouch == "on" {
		if len(slices.DeleteFunc(slices.Clone(c.Sizes), func(s Size) bool { return s <= guestTouchMax })) > 0 {
			return f, fmt.Errorf("--guest-touch on: the guest identity-maps %v of guest-physical memory; "+
				"choose --sizes of at most %v", guestTouchMax+4*GiB, guestTouchMax)
		}
	}
	f.sizes = uniq(c.Sizes)
	for _, s := range f.sizes {
		if s == 0 || s%(2*MiB) != 0 {
			return f, fmt.Errorf("--sizes: %v is not a positive multiple of 2 MiB", s)
		}
	}
	if c.HugepageSize == 0 || c.HugepageSize&(c.HugepageSize-1) != 0 || c.HugepageSize < 2*MiB {
		return f, fmt.Errorf("--hugepage-size %v: must be a power of two of at least 2 MiB", c.HugepageSize)
	}
	var err error
	if f.strategies, err = checkNames("--strategies", c.Strategies, allStrategies); err != nil {
		return f, err
	}
	f.explicitBackings = len(c.Backings) > 0
	f.backings = allBackings
	if f.explicitBackings {
		if f.backings, err = checkNames("--backings", c.Backings, allBackings); err != nil {
			return f, err
		}
	}
	f.explicitPeers = len(c.Peers) > 0
	f.peers = allPeers
	if f.explicitPeers && len(c.Peers) == 1 && strings.EqualFold(c.Peers[0], "none") {
		f.peers = nil
	} else if f.explicitPeers {
		if f.peers, err = checkNames("--peers", c.Peers, allPeers); err != nil {
			return f, err
		}
	}
	if f.explicitPeers && slices.Contains(f.peers, peerGokvm) {
		for _, s := range f.sizes {
			if s < gokvmMinSize {
				return f, fmt.Errorf("--peers gokvm: machine.New needs at least %v of guest RAM, not %v (--sizes)",
					gokvmMinSize, s)
			}
		}
	}
	if c.QEMU != "" && !slices.Contains(f.peers, peerQEMU) {
		return f, fmt.Errorf("--qemu given but the qemu peer is not in --peers %s", strings.Join(c.Peers, ","))
	}
	return f, nil
}

// plan checks every flag against the host before anything is allocated,
// and builds the jobs.
func (c *BenchCmd) plan(env *Env) (*bench, error) {
	f, err := c.flags()
	if err != nil {
		return nil, err
	}
	workers, sizes, strategies, backingNames, peers := f.workers, f.sizes, f.strategies, f.backings, f.peers
	explicitBackings, explicitPeers := f.explicitBackings, f.explicitPeers
	// Populating a guest needs the memory; a lazy guest (strategy none, no
	// peers) does not, so a 64 GiB guest can be timed on a smaller host.
	if len(peers) > 0 || slices.ContainsFunc(strategies, func(s string) bool { return s != stratNone }) {
		for _, s := range sizes {
			if err := checkFits(env.Root, s, "--sizes"); err != nil {
				return nil, err
			}
		}
	}

	rep := &Report{Command: "gmem " + strings.Join(env.Args, " "), Started: time.Now().UTC(), Runs: c.Runs,
		Warmup: c.Warmup, Workers: workers, Host: benchHost(env.Root)}
	b := &bench{report: rep, runs: c.Runs, warmup: c.Warmup, started: time.Now(), root: env.Root}
	note := func(format string, args ...any) { rep.Notes = append(rep.Notes, fmt.Sprintf(format, args...)) }

	// KVM: slot registration and the gokvm peer need it.
	if d, err := kvm.Open(c.KVMPath); err == nil {
		b.kvm = d
	} else {
		if explicitPeers && slices.Contains(peers, peerGokvm) {
			return nil, fmt.Errorf("peer gokvm needs KVM: %w", err)
		}
		note("KVM registration not measured, gokvm peer skipped: %v", err)
		peers = slices.DeleteFunc(slices.Clone(peers), func(p string) bool { return p == peerGokvm })
	}
	fail := func(err error) (*bench, error) {
		b.close()
		return nil, err
	}

	// QEMU.
	qemu := ""
	if slices.Contains(peers, peerQEMU) {
		qemu, err = findQEMU(c.QEMU)
		if err != nil {
			if explicitPeers || c.QEMU != "" {
				return fail(err)
			}
			note("qemu peer skipped: %v", err)
			peers = slices.DeleteFunc(slices.Clone(peers), func(p string) bool { return p == peerQEMU })
		} else {
			rep.Host.QEMU = qemuVersion(qemu)
		}
	}

	// Backings, per size: hugetlb needs a pool with enough free pages.
	pools := host.ReadHugePools(env.Root)
	type sizedBacking struct {
		size Size
		b    Backing
	}
	var matrix []sizedBacking
	for _, s := range sizes {
		for _, name := range backingNames {
			bk, err := backingByName(name, uint64(c.HugepageSize))
			if err != nil {
				return fail(err)
			}
			if bk.Kind == guestmem.Hugetlb {
				if err := pools.Check(bk.HugePage, uint64(s)); err != nil {
					if explicitBackings {
						return fail(fmt.Errorf("backing hugetlb unavailable for %v: %w", s, err))
					}
					note("hugetlb skipped at %v: %v", s, err)
					continue
				}
			}
			matrix = append(matrix, sizedBacking{s, bk})
		}
	}
	if b.kvm != nil {
		rep.Host.GoKVM = gokvmVersion()
	}

	// Jobs: for each size, gmem's strategies for each backing, then the
	// peers, so that each size's figures are measured close together.
	for _, s := range sizes {
		for _, sb := range matrix {
			if sb.size != s {
				continue
			}
			for _, st := range strategies {
				touch := b.kvm != nil && (st == stratNone || st == stratPrefaultN) &&
					(c.GuestTouch == "on" || c.GuestTouch == "auto" && s <= guestTouchAuto)
				b.jobs = append(b.jobs, gmemJob(s, sb.b, st, workers, b.kvm, touch))
			}
		}
		for _, sb := range matrix {
			if sb.size != s {
				continue
			}
			if slices.Contains(peers, peerMadvise) {
				b.jobs = append(b.jobs, madviseJob(s, sb.b, 1))
				if workers > 1 {
					b.jobs = append(b.jobs, madviseJob(s, sb.b, workers))
				}
			}
			if slices.Contains(peers, peerMemset) {
				b.jobs = append(b.jobs, memsetJob(s, sb.b, 1))
				if workers > 1 {
					b.jobs = append(b.jobs, memsetJob(s, sb.b, workers))
				}
			}
			if slices.Contains(peers, peerQEMU) {
				if j, ok := qemuJob(qemu, s, sb.b, workers, b.kvm != nil); ok {
					b.jobs = append(b.jobs, j)
				}
			}
		}
		if slices.Contains(peers, peerGokvm) {
			if s < gokvmMinSize { // named in --peers, flags refused it
				note("gokvm skipped at %v: machine.New needs at least %v", s, gokvmMinSize)
			} else {
				b.jobs = append(b.jobs, gokvmJob(c.KVMPath, s))
			}
		}
	}
	if slices.Contains(peers, peerQEMU) && !slices.Contains(backingNames, backingAnonTHP) &&
		!slices.Contains(backingNames, backingMemfd) && !slices.Contains(backingNames, backingHugetlb) {
		note("qemu peer: none of the chosen backings has a QEMU counterpart (anon-thp, memfd, hugetlb)")
	}
	if len(b.jobs) == 0 {
		return fail(errors.New("nothing to measure: every backing or peer asked for was skipped"))
	}
	b.total = len(b.jobs) * (c.Warmup + c.Runs)
	if !c.NoProgress {
		if f, ok := env.Stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			b.bar = progressbar.NewOptions(b.total, progressbar.OptionSetWriter(env.Stderr),
				progressbar.OptionShowCount(), progressbar.OptionSetWidth(30), progressbar.OptionClearOnFinish(),
				progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionSetElapsedTime(true),
				progressbar.OptionShowDescriptionAtLineEnd())
		}
	}
	return b, nil
}

// checkNames checks that every name is one of valid, and drops repeats.
func checkNames(flag string, names, valid []string) ([]string, error) {
	var out []string
	for _, n := range names {
		n = strings.ToLower(strings.TrimSpace(n))
		if !slices.Contains(valid, n) {
			return nil, fmt.Errorf("%s: unknown name %q (want some of %s)", flag, n, strings.Join(valid, ", "))
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no name given", flag)
	}
	return out, nil
}

func uniq[T comparable](in []T) []T {
	var out []T
	for _, v := range in {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

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

func (b *bench) close() {
	if b.kvm != nil {
		b.kvm.Close()
		b.kvm = nil
	}
}

// run measures every job in order, one at a time, releasing each job's
// memory before the next. When ctx is cancelled it stops, and the report
// holds what was measured so far.
func (b *bench) run(ctx context.Context) (*Report, error) {
	defer func() {
		if b.bar != nil {
			b.bar.Clear() // the table follows on stdout: leave no bar above it
			b.bar.Exit()
		}
	}()
	var errs []error
	for _, j := range b.jobs {
		if ctx.Err() != nil {
			break
		}
		res, err := b.runJob(ctx, j)
		if res != nil {
			b.report.Results = append(b.report.Results, *res)
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
			b.report.Notes = append(b.report.Notes, fmt.Sprintf("peer %s failed: %v", label, err))
			continue
		}
		errs = append(errs, fmt.Errorf("%s: %w", label, err))
	}
	b.report.Elapsed = time.Since(b.started).Round(time.Millisecond)
	b.report.Host.LoadEnd = loadAverage(b.root)
	if n := busyNote(b.report.Host); n != "" {
		b.report.Notes = append(b.report.Notes, n)
	}
	if err := ctx.Err(); err != nil {
		b.report.Interrupted = true
		b.report.Notes = append(b.report.Notes, fmt.Sprintf("interrupted after %d of %d runs", b.done, b.total))
		return b.report, err
	}
	return b.report, errors.Join(errs...)
}

// runJob times one job warmup+runs times and summarizes it.
func (b *bench) runJob(ctx context.Context, j job) (res *Result, err error) {
	if b.bar != nil {
		b.bar.Describe(fmt.Sprintf("%v %s %s", j.size, j.backing, j.method))
	}
	once, release, err := j.open(ctx)
	if err != nil {
		b.skip(b.warmup + b.runs)
		return nil, err
	}
	defer func() { err = errors.Join(err, release()) }()
	var samples []sample
	n := b.warmup + b.runs
	for i := range n {
		if ctx.Err() != nil {
			b.skip(n - i)
			break
		}
		s, err := once(ctx)
		if err != nil {
			b.skip(n - i)
			if ctx.Err() != nil {
				break // what was measured before the interruption is kept
			}
			return nil, err
		}
		samples = append(samples, s)
		b.done++
		if b.bar != nil {
			b.bar.Add(1)
		}
	}
	if len(samples) == 0 {
		return nil, ctx.Err()
	}
	r := summarizeJob(j, samples, b.warmup)
	if len(samples) < n {
		r.Note = strings.TrimPrefix(r.Note+"; ", "; ") + fmt.Sprintf("interrupted: %d of %d runs", len(samples), n)
	}
	return &r, ctx.Err()
}

// skip accounts runs that will not happen, so the bar still ends full.
func (b *bench) skip(n int) {
	if b.bar != nil && n > 0 {
		b.bar.Add(n)
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
