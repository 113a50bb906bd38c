//go:build amd64

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/demo"
	"github.com/gmem-vmm/gmem/kvm"
)

// RunCmd is `gmem run`: the main job on an embedded default guest.
type RunCmd struct {
	Size        Size   `default:"512M" placeholder:"SIZE" help:"Guest RAM, a multiple of 2 MiB from 4M to 65472M, split in two regions around a 64 MiB hole (default: ${default})."`
	Backing     string `default:"memfd" enum:"anon,memfd,hugetlb" help:"Backing of guest RAM: anon, memfd or hugetlb (2 MiB pages; needs a pool) (default: ${default})."`
	NoPrefault  bool   `help:"Do not prefault: the guest populates memory as it touches it."`
	NoHugepages bool   `help:"Do not ask for transparent hugepages."`
	LockOnFault bool   `help:"Lock guest pages in memory as they are touched (mlock2 MLOCK_ONFAULT)."`
	Workers     int    `default:"0" placeholder:"N" help:"Prefault workers, 0 for one per CPU (default: the number of CPUs)."`
	KVMPath     string `name:"kvm" default:"/dev/kvm" placeholder:"PATH" help:"KVM device (default: ${default})."`
	JSON        bool   `help:"Print the steps as JSON instead of a summary."`
}

// Validate checks the flags on their own, before the host is looked at:
// kong calls it while parsing, so a bad value exits 2.
func (c *RunCmd) Validate() error {
	if _, err := demo.Layout(uint64(c.Size)); err != nil {
		return fmt.Errorf("--size %v: must be a multiple of 2 MiB from %v to %v", c.Size, Size(demo.MinSize),
			Size(demo.MaxSize))
	}
	if c.Workers < 0 {
		return fmt.Errorf("--workers %d: must not be negative (0 is one per CPU)", c.Workers)
	}
	return nil
}

// Run checks the host, runs the demo and prints the summary. Steps are
// printed as they finish; on Ctrl-C what finished is still shown and all
// guest memory is released.
func (c *RunCmd) Run(env *Env) error {
	cfg := demo.DefaultConfig()
	cfg.Size, cfg.Prefault, cfg.Hugepages, cfg.LockOnFault = uint64(c.Size), !c.NoPrefault, !c.NoHugepages, c.LockOnFault
	cfg.Workers, cfg.KVMPath = c.Workers, c.KVMPath
	switch c.Backing {
	case "anon":
		cfg.Backing = guestmem.Anonymous
	case "memfd":
		cfg.Backing = guestmem.Memfd
	case "hugetlb":
		cfg.Backing = guestmem.Hugetlb
		if err := host.ReadHugePools(env.Root).Check(2<<20, uint64(c.Size)); err != nil {
			return fmt.Errorf("backing hugetlb is unavailable: %w", err)
		}
	}
	if err := checkFits(env.Root, c.Size, "--size"); err != nil {
		return err
	}
	// Check KVM before allocating anything: without it, one line that says
	// what to do.
	d, err := kvm.Open(c.KVMPath)
	if err != nil {
		return fmt.Errorf("gmem run needs KVM: %w", err)
	}
	d.Close()

	var live io.Writer = env.Stdout
	if c.JSON {
		live = io.Discard
	}
	fmt.Fprintf(live, "gmem run: %v guest, %s backing, prefault %v, transparent hugepages %v, lock-on-fault %v\n",
		c.Size, cfg.Backing, cfg.Prefault, cfg.Hugepages, cfg.LockOnFault)
	start := time.Now()
	rep, runErr := demo.Run(env.Ctx, cfg, func(s demo.Step) {
		fmt.Fprintf(live, "  %-26s %10s  %s\n", s.Name, round(s.Duration), s.Detail)
	})
	total := time.Since(start)
	if c.JSON {
		out := struct {
			demo.Report
			TotalNS time.Duration `json:"total_ns"`
			Error   string        `json:"error,omitempty"`
		}{Report: rep, TotalNS: total}
		if runErr != nil {
			out.Error = runErr.Error()
		}
		enc := json.NewEncoder(env.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return errors.Join(runErr, err)
		}
	} else if runErr == nil {
		fmt.Fprintf(live, "done in %s: %d steps; guest memory released\n", round(total), len(rep.Steps))
	}
	if runErr != nil && env.Ctx.Err() != nil {
		return fmt.Errorf("%w after %d steps (%s); guest memory released", errInterrupted, len(rep.Steps), round(total))
	}
	return runErr
}

func round(d time.Duration) time.Duration {
	switch {
	case d > time.Second:
		return d.Round(time.Millisecond)
	case d > time.Millisecond:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}
