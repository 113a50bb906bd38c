//go:build amd64

package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/gmem-vmm/gmem/internal/bench"
)

// BenchCmd is `gmem bench`: time guest-memory setup, phase by phase, for a
// matrix of sizes, backings and prefault strategies, against peers measured
// in the same run. The harness is package bench; the command checks the
// flags and prints.
type BenchCmd struct {
	Sizes        []Size   `default:"1G,4G" sep:"," placeholder:"SIZE" help:"Guest sizes, multiples of 2 MiB: 512M, 4G, 4GiB, 1T... (default: ${default})."`
	Backings     []string `sep:"," placeholder:"NAME" help:"Backings among anon, anon-thp, memfd, hugetlb, gmem (guest_memfd). Default: all the host offers (hugetlb only with a big enough pool, gmem only with KVM whose guest_memfd the host can map); one named here that the host lacks is an error."`
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

// Run checks the flags and the host, runs the matrix (package bench), and
// prints it.
func (c *BenchCmd) Run(env *Env) error {
	f, err := c.flags()
	if err != nil {
		return err
	}
	// Populating a guest needs the memory; a lazy guest (strategy none, no
	// peers) does not, so a 64 GiB guest can be timed on a smaller host.
	if bench.Populates(f.strategies, f.peers) {
		for _, s := range f.sizes {
			if err := checkFits(env.Root, s, "--sizes"); err != nil {
				return err
			}
		}
	}
	var bar *progressbar.ProgressBar
	p, err := bench.New(bench.Config{Sizes: f.sizes, Strategies: f.strategies, Backings: f.backings, Peers: f.peers,
		ExplicitBackings: f.explicitBackings, ExplicitPeers: f.explicitPeers, Workers: f.workers, Runs: c.Runs,
		Warmup: c.Warmup, HugepageSize: uint64(c.HugepageSize), QEMU: c.QEMU, KVMPath: c.KVMPath,
		GuestTouch: c.GuestTouch, Root: env.Root, Command: "gmem " + strings.Join(env.Args, " "),
		Progress: func(runs int, figure string) {
			switch {
			case bar == nil:
			case runs == 0:
				bar.Describe(figure)
			default:
				bar.Add(runs)
			}
		}})
	if err != nil {
		return err
	}
	defer p.Close()
	if sf, ok := env.Stderr.(*os.File); ok && !c.NoProgress && term.IsTerminal(int(sf.Fd())) {
		bar = progressbar.NewOptions(p.Total(), progressbar.OptionSetWriter(env.Stderr),
			progressbar.OptionShowCount(), progressbar.OptionSetWidth(30), progressbar.OptionClearOnFinish(),
			progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionSetElapsedTime(true),
			progressbar.OptionShowDescriptionAtLineEnd())
	}
	rep, runErr := p.Run(env.Ctx)
	if bar != nil {
		bar.Clear() // the table follows on stdout: leave no bar above it
		bar.Exit()
	}
	if err := c.output(env.Stdout, rep); err != nil {
		return errors.Join(runErr, err)
	}
	if c.Plot != "" && len(rep.Results) > 0 {
		if err := bench.WritePlot(c.Plot, rep); err != nil {
			return errors.Join(runErr, fmt.Errorf("--plot %s: %w", c.Plot, err))
		}
	}
	if runErr != nil && env.Ctx.Err() != nil {
		return fmt.Errorf("%w: stopped after %d of %d runs; the results above are what was measured",
			errInterrupted, p.Done(), p.Total())
	}
	return runErr
}

func (c *BenchCmd) output(w io.Writer, rep *bench.Report) error {
	switch {
	case c.JSON:
		return bench.WriteJSON(w, rep)
	case c.CSV:
		return bench.WriteCSV(w, rep)
	}
	return bench.WriteTable(w, rep)
}

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
		if len(slices.DeleteFunc(slices.Clone(c.Sizes), func(s Size) bool { return s <= bench.GuestTouchMax })) > 0 {
			return f, fmt.Errorf("--guest-touch on: the guest identity-maps %v of guest-physical memory; "+
				"choose --sizes of at most %v", bench.GuestTouchMax+4*GiB, bench.GuestTouchMax)
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
	if f.strategies, err = checkNames("--strategies", c.Strategies, bench.StrategyNames); err != nil {
		return f, err
	}
	f.explicitBackings = len(c.Backings) > 0
	f.backings = bench.BackingNames
	if f.explicitBackings {
		if f.backings, err = checkNames("--backings", c.Backings, bench.BackingNames); err != nil {
			return f, err
		}
	}
	f.explicitPeers = len(c.Peers) > 0
	f.peers = bench.PeerNames
	if f.explicitPeers && len(c.Peers) == 1 && strings.EqualFold(c.Peers[0], "none") {
		f.peers = nil
	} else if f.explicitPeers {
		if f.peers, err = checkNames("--peers", c.Peers, bench.PeerNames); err != nil {
			return f, err
		}
	}
	if f.explicitPeers && slices.Contains(f.peers, bench.PeerGokvm) {
		for _, s := range f.sizes {
			if s < bench.GokvmMinSize {
				return f, fmt.Errorf("--peers gokvm: machine.New needs at least %v of guest RAM, not %v (--sizes)",
					bench.GokvmMinSize, s)
			}
		}
	}
	if c.QEMU != "" && !slices.Contains(f.peers, bench.PeerQEMU) {
		return f, fmt.Errorf("--qemu given but the qemu peer is not in --peers %s", strings.Join(c.Peers, ","))
	}
	return f, nil
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
