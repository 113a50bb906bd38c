//go:build amd64

// Package demo is the main job of `gmem run`: it builds guest memory with a
// hole in its layout, prefaults it, registers it with KVM, runs guest code
// that writes and verifies every page, then shows dirty tracking, a balloon
// discard and a snapshot round trip, timing each step. Where each step
// reads and writes is planned from the size alone (NewPlan), and OpenKVM
// opens /dev/kvm with advice drawn from the node's actual mode and group.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/kvm"
)

// Config is what `gmem run` lets the user choose.
type Config struct {
	Size        uint64           // guest RAM in bytes (split in two regions around a hole)
	Backing     guestmem.Backing // Anonymous, Memfd or Hugetlb (2 MiB pages)
	Prefault    bool             // populate guest RAM before the guest runs
	Hugepages   bool             // ask for transparent hugepages
	LockOnFault bool             // lock guest pages as they are touched
	Workers     int              // prefault workers; 0: one per CPU
	TempDir     string           // where the snapshot file goes ("" for os.TempDir)
	KVMPath     string           // "" for /dev/kvm
}

// DefaultConfig is the embedded default: a 512 MiB memfd-backed guest,
// prefaulted, with transparent hugepages requested.
func DefaultConfig() Config {
	return Config{Size: 512 << 20, Backing: guestmem.Memfd, Prefault: true, Hugepages: true}
}

// Step is one timed step.
type Step struct {
	Name     string        `json:"name"`
	Duration time.Duration `json:"duration_ns"`
	Detail   string        `json:"detail"`
}

// Report is everything Run measured, in order; on error or interruption it
// holds the steps that finished.
type Report struct {
	Layout guestmem.Layout `json:"layout"`
	Steps  []Step          `json:"steps"`
}

const seed = 0x6d65_6d00_0000_0000

// Run runs the demo, calling step after each step. It releases everything
// it created before returning, also when ctx is cancelled.
func Run(ctx context.Context, c Config, step func(Step)) (rep Report, err error) {
	plan, err := NewPlan(c.Size, c.Backing)
	if err != nil {
		return rep, err
	}
	layout := plan.Layout
	rep.Layout = layout
	timed := func(name string, fn func() (string, error)) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		t0 := time.Now()
		detail, err := fn()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		s := Step{Name: name, Duration: time.Since(t0), Detail: detail}
		rep.Steps = append(rep.Steps, s)
		if step != nil {
			step(s)
		}
		return nil
	}
	var cleanups []func() error
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			err = errors.Join(err, cleanups[i]())
		}
	}()

	var m *guestmem.Memory
	if err := timed("map guest RAM", func() (string, error) {
		opts := []guestmem.Option{guestmem.WithName("gmem-run")}
		switch c.Backing {
		case guestmem.Memfd:
			opts = append(opts, guestmem.WithMemfd())
		case guestmem.Hugetlb:
			opts = append(opts, guestmem.WithHugetlb(2<<20))
		}
		if !c.Hugepages {
			opts = append(opts, guestmem.WithoutHugepages())
		}
		var err error
		if m, err = guestmem.New(layout, opts...); err != nil {
			return "", err
		}
		cleanups = append(cleanups, m.Close)
		return fmt.Sprintf("%s, %d regions around a %d MiB hole", c.Backing, len(layout), hole>>20), nil
	}); err != nil {
		return rep, err
	}
	if c.LockOnFault {
		if err := timed("lock on fault", func() (string, error) { return "mlock2(MLOCK_ONFAULT)", m.LockOnFault() }); err != nil {
			return rep, err
		}
	}
	if c.Prefault {
		if err := timed("prefault", func() (string, error) {
			t0 := time.Now()
			err := m.Prefault(ctx, guestmem.PrefaultOptions{Workers: c.Workers})
			return fmt.Sprintf("%.2f GiB/s", float64(c.Size)/(1<<30)/time.Since(t0).Seconds()), err
		}); err != nil {
			return rep, err
		}
	}

	var mach *guest.Machine
	if err := timed("register with KVM", func() (string, error) {
		d, err := kvm.Open(c.KVMPath)
		if err != nil {
			return "", err
		}
		defer d.Close()
		vm, err := d.CreateVM()
		if err != nil {
			return "", err
		}
		cleanups = append(cleanups, vm.Close)
		if mach, err = guest.New(vm, guest.Config{SysBase: plan.SysBase}); err != nil {
			return "", err
		}
		cleanups = append(cleanups, mach.Close)
		if err := m.StartDirtyTracking(); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d slots, dirty logging on", len(layout)), m.Register(vm)
	}); err != nil {
		return rep, err
	}

	pages := plan.Pages
	if err := timed("guest writes every page", func() (string, error) {
		t0 := time.Now()
		for _, r := range m.Regions() {
			if err := call(mach, guest.FillPages(), kvm.Regs{RSI: uint64(r.GPA), RDI: uint64(r.End()), RDX: seed,
				RBX: page}, nil); err != nil {
				return "", err
			}
		}
		return fmt.Sprintf("%d pages, %.0f pages/s in the guest", pages, float64(pages)/time.Since(t0).Seconds()), nil
	}); err != nil {
		return rep, err
	}
	if err := timed("guest verifies every page", func() (string, error) {
		for _, r := range m.Regions() {
			var bad uint64
			err := call(mach, guest.VerifyPages(), kvm.Regs{RSI: uint64(r.GPA), RDI: uint64(r.End()), RDX: seed,
				RBX: page}, func(res guest.Result) error {
				if _, failed := res.Port(guest.PortFail); failed {
					bad, _ = res.Port64(guest.PortLo, guest.PortHi)
					return fmt.Errorf("guest found a wrong value at %#x", bad)
				}
				return nil
			})
			if err != nil {
				return "", err
			}
		}
		// The guest's checksum, reported through port I/O, against the host's.
		r := m.Regions()[plan.SumRegion]
		var gsum uint64
		if err := call(mach, guest.SumPages(), kvm.Regs{RSI: uint64(r.GPA), RDI: uint64(r.End()), RBX: page},
			func(res guest.Result) error { gsum, _ = res.Port64(guest.PortLo, guest.PortHi); return nil }); err != nil {
			return "", err
		}
		hsum, err := hostSum(m, r)
		if err != nil {
			return "", err
		}
		if gsum != hsum {
			return "", fmt.Errorf("guest checksum %#x, host checksum %#x", gsum, hsum)
		}
		return fmt.Sprintf("all correct; guest and host checksums agree (%#x)", gsum), nil
	}); err != nil {
		return rep, err
	}
	if err := timed("dirty pages", func() (string, error) {
		d, err := m.CollectDirty()
		if err != nil {
			return "", err
		}
		first := d.Pages()
		if first != plan.Pages {
			return "", fmt.Errorf("%d pages dirty after the guest wrote all %d", first, plan.Pages)
		}
		g := plan.GuestDirty
		if err := call(mach, guest.FillPages(), kvm.Regs{RSI: uint64(g.GPA), RDI: uint64(g.GPA) + g.Size,
			RDX: seed, RBX: page}, nil); err != nil {
			return "", err
		}
		for i, a := range plan.HostDirty {
			if err := m.WriteUint64(a, uint64(i)); err != nil {
				return "", err
			}
		}
		if d, err = m.CollectDirty(); err != nil {
			return "", err
		}
		if d.Pages() != plan.DirtyAfter() {
			return "", fmt.Errorf("%d pages dirty after the guest wrote %d and the host %d, not %d", d.Pages(),
				plan.GuestDirtyPages(), len(plan.HostDirty), plan.DirtyAfter())
		}
		return fmt.Sprintf("%d after the guest wrote everything; then %d (%d by the guest, %d by the host)",
			first, d.Pages(), plan.GuestDirtyPages(), len(plan.HostDirty)), nil
	}); err != nil {
		return rep, err
	}
	if err := timed("balloon discard", func() (string, error) {
		b := plan.Balloon
		before, err := resident(m)
		if err != nil {
			return "", err
		}
		if c.LockOnFault {
			if err := m.Unlock(); err != nil {
				return "", err
			}
		}
		if err := m.Discard(b.GPA, b.Size); err != nil {
			return "", err
		}
		after, err := resident(m)
		if err != nil {
			return "", err
		}
		var gsum uint64
		if err := call(mach, guest.SumPages(), kvm.Regs{RSI: uint64(b.GPA), RDI: uint64(b.GPA) + b.Size, RBX: page},
			func(res guest.Result) error { gsum, _ = res.Port64(guest.PortLo, guest.PortHi); return nil }); err != nil {
			return "", err
		}
		if gsum != 0 {
			return "", fmt.Errorf("the guest reads %#x in discarded memory, not zeros", gsum)
		}
		return fmt.Sprintf("%s MiB returned: resident %s → %s MiB; the guest reads zeros there", mib(b.Size),
			mib(before), mib(after)), nil
	}); err != nil {
		return rep, err
	}

	dir := c.TempDir
	if dir == "" {
		dir = os.TempDir()
	}
	f, err := os.CreateTemp(dir, "gmem-run-*.snap")
	if err != nil {
		return rep, err
	}
	cleanups = append(cleanups, func() error { f.Close(); return os.Remove(f.Name()) })
	var saved guestmem.SaveStats
	if err := timed("snapshot save", func() (string, error) {
		saved, err = m.Save(ctx, f, guestmem.SaveOptions{})
		return fmt.Sprintf("%s MiB of data in %s MiB of stream (%s)", mib(saved.DataBytes), mib(uint64(saved.Bytes)),
			filepath.Base(f.Name())), err
	}); err != nil {
		return rep, err
	}
	want, err := hostSum(m, m.Regions()[plan.SumRegion])
	if err != nil {
		return rep, err
	}
	for _, lazy := range []bool{false, true} {
		name := "snapshot restore (eager)"
		if lazy {
			name = "snapshot restore (lazy)"
		}
		if err := timed(name, func() (string, error) {
			var r *guestmem.Memory
			var err error
			if lazy {
				r, err = guestmem.RestoreLazy(ctx, []*os.File{f}, guestmem.WithLayout(layout))
			} else {
				if _, err := f.Seek(0, 0); err != nil {
					return "", err
				}
				r, err = guestmem.Restore(ctx, []io.Reader{f}, guestmem.WithLayout(layout))
			}
			if err != nil {
				return "", err
			}
			defer r.Close()
			got, err := hostSum(r, r.Regions()[plan.SumRegion])
			if err != nil {
				return "", err
			}
			if got != want {
				return "", fmt.Errorf("restored checksum %#x, saved %#x", got, want)
			}
			return "checksums match", nil
		}); err != nil {
			return rep, err
		}
	}
	if err := timed("snapshot restore (userfaultfd)", func() (string, error) {
		return onDemand(ctx, c, plan, f, want)
	}); err != nil {
		return rep, err
	}
	return rep, nil
}

// onDemand restores the snapshot in f through userfaultfd with no
// background fill, registers it with a VM of its own, and has the guest
// checksum the sum region, so every page it reads arrives by a KVM-driven
// fault; then fills the rest.
func onDemand(ctx context.Context, c Config, plan Plan, f *os.File, want uint64) (string, error) {
	t0 := time.Now()
	r, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{f}, guestmem.OnDemandOptions{Fillers: -1},
		guestmem.WithLayout(plan.Layout))
	if err != nil {
		return "", err
	}
	defer r.Close()
	ready := time.Since(t0)
	d, err := kvm.Open(c.KVMPath)
	if err != nil {
		return "", err
	}
	defer d.Close()
	vm, err := d.CreateVM()
	if err != nil {
		return "", err
	}
	defer vm.Close()
	mach, err := guest.New(vm, guest.Config{SysBase: plan.SysBase})
	if err != nil {
		return "", err
	}
	defer mach.Close()
	if err := r.Register(vm); err != nil {
		return "", err
	}
	reg := r.Regions()[plan.SumRegion]
	t1 := time.Now()
	var gsum uint64
	if err := call(mach, guest.SumPages(), kvm.Regs{RSI: uint64(reg.GPA), RDI: uint64(reg.End()), RBX: page},
		func(res guest.Result) error { gsum, _ = res.Port64(guest.PortLo, guest.PortHi); return nil }); err != nil {
		return "", err
	}
	if gsum != want {
		return "", fmt.Errorf("the guest's checksum of restored memory %#x, saved %#x", gsum, want)
	}
	summed := time.Since(t1)
	p := od.Progress()
	if err := od.Fill(ctx); err != nil {
		return "", err
	}
	if err := od.Wait(ctx); err != nil {
		return "", err
	}
	return fmt.Sprintf("ready in %v; the guest's checksum of %s MiB matches after %d faults fetched data "+
		"(p50 %v, p99 %v) in %v; resident after %v", ready.Round(time.Microsecond), mib(reg.Size), p.FaultFetches,
		p.FaultP50.Round(time.Microsecond), p.FaultP99.Round(time.Microsecond), summed.Round(time.Millisecond),
		time.Since(t0).Round(time.Millisecond)), nil
}

// call runs a standard program to its HLT and hands the result to check.
func call(mach *guest.Machine, prog *guest.Asm, regs kvm.Regs, check func(guest.Result) error) error {
	at, err := mach.LoadAsm(prog)
	if err != nil {
		return err
	}
	res, err := mach.Call(at, regs, guest.Handlers{})
	if err != nil {
		return err
	}
	if _, ok := res.Port(guest.PortDone); !ok {
		if _, failed := res.Port(guest.PortFail); !failed {
			return fmt.Errorf("the guest halted without reporting")
		}
	}
	if check != nil {
		return check(res)
	}
	return nil
}

func hostSum(m *guestmem.Memory, r guestmem.Region) (uint64, error) {
	var sum uint64
	for a := r.GPA; a < r.End(); a += page {
		v, err := m.ReadUint64(a)
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return sum, nil
}

func resident(m *guestmem.Memory) (uint64, error) {
	st, err := m.Stats()
	if err != nil {
		return 0, err
	}
	var n uint64
	for _, s := range st {
		n += s.Resident
	}
	return n, nil
}

// mib formats n bytes in MiB: whole, or with one decimal (0.5 MiB).
func mib(n uint64) string {
	if n%(1<<20) == 0 {
		return fmt.Sprint(n >> 20)
	}
	return fmt.Sprintf("%.1f", float64(n)/(1<<20))
}
