//go:build amd64

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/units"
)

// ProbeCmd is `gmem probe`: what this host offers guests (package host),
// as a table or JSON.
type ProbeCmd struct {
	JSON        bool   `help:"Print the report as JSON instead of a table."`
	KVMPath     string `name:"kvm" default:"/dev/kvm" placeholder:"PATH" help:"KVM device to probe (default: ${default})."`
	NoMeasure   bool   `help:"Do not time populating anonymous and memfd memory (the advice then has no figures)."`
	MeasureSize Size   `default:"64M" placeholder:"SIZE" help:"Bytes populated per backing when timing (default 64M)."`
}

// Validate checks the flags on their own, before the host is looked at:
// kong calls it while parsing, so a bad value exits 2.
func (c *ProbeCmd) Validate() error {
	if c.MeasureSize < 2*MiB || c.MeasureSize%(2*MiB) != 0 {
		return fmt.Errorf("--measure-size %v: must be a positive multiple of 2 MiB", c.MeasureSize)
	}
	return nil
}

// Run probes the host and prints the report.
func (c *ProbeCmd) Run(env *Env) error {
	opts := host.Options{Root: env.Root, KVMPath: c.KVMPath}
	if !c.NoMeasure {
		if err := checkFits(env.Root, c.MeasureSize, "--measure-size"); err != nil {
			return err
		}
		opts.MeasureSize = uint64(c.MeasureSize)
	}
	f, err := host.Probe(env.Ctx, opts)
	if err != nil {
		if env.Ctx.Err() != nil {
			return fmt.Errorf("%w: probe stopped", errInterrupted)
		}
		return err
	}
	for i := range f.Advice {
		f.Advice[i].Text = gmemAdvice(f, f.Advice[i])
	}
	if c.JSON {
		enc := json.NewEncoder(env.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(f)
	}
	return renderProbe(env.Stdout, f)
}

// gmemAdvice is the text of a, with what it means for gmem bench.
func gmemAdvice(f *host.Facts, a host.Advice) string {
	switch {
	case a.Topic == host.TopicKVM && !f.KVM.Present:
		return a.Text + " gmem bench will skip KVM registration and the gokvm peer."
	case a.Topic == host.TopicHugetlbPool:
		return strings.Replace(a.Text, "is unavailable.", "is unavailable (gmem bench skips it).", 1)
	}
	return a.Text
}

// renderProbe prints f as a table.
func renderProbe(w io.Writer, f *host.Facts) error {
	tw := &errWriter{w: w}
	section := func(name string) { fmt.Fprintf(tw, "%s\n", name) }
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "  %-23s %s\n", k, fmt.Sprintf(format, args...)) }
	yes := func(b bool) string {
		if b {
			return "yes"
		}
		return "no"
	}

	section("HOST")
	row("kernel", "%s", f.Kernel)
	row("memory", "%s available of %s", units.Human(f.Memory.Available), units.Human(f.Memory.Total))

	section("KVM")
	switch {
	case f.KVM.Usable:
		row(f.KVM.Path, "present, read-write, API version %d", f.KVM.APIVersion)
	case f.KVM.Present:
		row(f.KVM.Path, "present, not usable: %s", f.KVM.Error)
	default:
		row(f.KVM.Path, "absent")
	}
	if c := f.KVM.Caps; c != nil {
		row("memory slots", "%d", c.Memslots)
		row("read-only slots", "%s", yes(c.ReadonlyMem))
		row("user memory2", "%s", yes(c.UserMemory2))
		row("guest_memfd", "%s", yes(c.GuestMemfd))
		if c.GuestMemfd {
			mapped := "no host mapping (Linux 6.18 adds it): --backings gmem unavailable"
			if c.GuestMemfdMmap {
				mapped = "the host can map it: guestmem.WithGuestMemfd, --backings gmem"
			}
			row("guest_memfd flags", "%s (%s)", c.GuestMemfdFlags, mapped)
		}
		row("manual dirty log", "%s", yes(c.ManualDirtyLog))
		if c.DirtyRingBytes > 0 {
			row("dirty ring", "yes, up to %s", units.Human(uint64(c.DirtyRingBytes)))
		} else {
			row("dirty ring", "no")
		}
		row("vCPUs (recommended)", "%d", c.VCPUs)
	} else if f.KVM.Usable && f.KVM.Error != "" {
		row("capabilities", "unreadable: %s", f.KVM.Error)
	}

	section("TRANSPARENT HUGEPAGES")
	orAbsent := func(s string) string {
		if s == "" {
			return "(absent)"
		}
		return s
	}
	row("enabled", "%s", orAbsent(f.THP.Enabled))
	row("defrag", "%s", orAbsent(f.THP.Defrag))
	row("shmem_enabled", "%s", orAbsent(f.THP.ShmemEnabled))

	section("HUGETLB POOLS")
	if len(f.HugePools) == 0 {
		row("(none)", "")
	}
	for _, pool := range f.HugePools {
		row(Size(pool.PageSize).String()+" pages", "%d free of %d", pool.Free, pool.Total)
	}

	section("NUMA NODES")
	if len(f.NUMA) == 0 {
		row("(none)", "a kernel without NUMA")
	}
	for _, n := range f.NUMA {
		cpus := n.CPUs
		if cpus == "" {
			cpus = "none"
		}
		row(fmt.Sprintf("node %d", n.ID), "%s free of %s, CPUs %s", units.Human(n.Free), units.Human(n.Total), cpus)
	}

	section("KSM")
	if k := f.KSM; !k.Available {
		row("(absent)", "no /sys/kernel/mm/ksm")
	} else {
		runs := map[int]string{0: "stopped", 1: "running", 2: "stopped, everything unmerged"}[k.Run]
		row("ksmd", "run=%d (%s), %d pages every %d ms", k.Run, runs, k.PagesToScan, k.SleepMillisecs)
		row("merged", "%d pages into %d (as of ksmd's last scan)", k.PagesSharing, k.PagesShared)
		row("merge_across_nodes", "%d", k.MergeAcrossNodes)
	}

	section("LIMITS")
	if f.Memlock.Error != "" {
		row("RLIMIT_MEMLOCK", "unknown: %s", f.Memlock.Error)
	} else {
		lim := func(v int64) string {
			if v < 0 {
				return "unlimited"
			}
			return units.Human(uint64(v))
		}
		exempt := ""
		if f.Memlock.CapIPCLock {
			exempt = " (not enforced: CAP_IPC_LOCK)"
		}
		row("RLIMIT_MEMLOCK", "%s soft, %s hard%s", lim(f.Memlock.Soft), lim(f.Memlock.Hard), exempt)
	}
	row("overcommit_memory", "%d (%s)", f.Overcommit.Mode, f.Overcommit.Meaning)

	section("SYSCALLS")
	works := func(c host.Check) string {
		if c.Works {
			return "works"
		}
		return "fails: " + c.Error
	}
	row("MADV_POPULATE_WRITE", "%s", works(f.PopulateWrite))
	row("mlock2(MLOCK_ONFAULT)", "%s", works(f.MlockOnFault))

	if c := f.PopulateCost; c != nil {
		section("POPULATE COST (" + units.Human(c.Size) + ", " + c.Method + ")")
		cost := func(d time.Duration, huge float64) string {
			return fmt.Sprintf("%s (%.1f GiB/s, %.0f%% huge)", units.FormatDuration(d), units.GiBPerSec(c.Size, d),
				100*huge)
		}
		row("anonymous + THP", "%s", cost(c.AnonTHP, c.AnonHuge))
		row("memfd", "%s", cost(c.Memfd, c.MemfdHuge))
		row("memfd / anonymous", "%.1fx", c.Ratio())
	}
	section("ADVICE")
	if len(f.Advice) == 0 {
		fmt.Fprintln(tw, "  nothing to change")
	}
	for _, a := range f.Advice {
		fmt.Fprintf(tw, "  - %s\n", a.Text)
	}
	return tw.err
}

// errWriter remembers the first write error, so a renderer can write
// freely and check once.
type errWriter struct {
	w   io.Writer
	err error
}

// Write writes p unless an earlier write failed.
func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	e.err = err
	return n, err
}
