//go:build amd64

package bench

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/units"
	"github.com/gmem-vmm/gmem/kvm"
)

// strategyLabel is the method column of a gmem strategy.
func strategyLabel(st string, workers int) string {
	switch st {
	case StrategyPrefault1:
		return "prefault x1"
	case StrategyPrefaultN:
		return fmt.Sprintf("prefault x%d", workers)
	}
	return st
}

// guestTouchAuto is the largest guest whose first touch by a vCPU is timed
// by default (--guest-touch auto); GuestTouchMax is the largest at all: the
// harness identity-maps 64 GiB of guest-physical space, and the x86 layout
// puts RAM past 3 GiB above 4 GiB.
const (
	guestTouchAuto = 1 * units.GiB
	GuestTouchMax  = 60 * units.GiB
)

// gmemJob times guest RAM set up by guestmem: New (reserve and map),
// Register with a VM, the prefault strategy, optionally a vCPU writing every
// page (touch), and Close. dev may be nil (no KVM): registration and the
// guest touch are then not measured.
func gmemJob(size units.Size, bk BackingChoice, st string, workers int, dev *kvm.Device, touch bool) job {
	w := 1
	if st == StrategyPrefaultN {
		w = workers
	}
	j := job{size: size, backing: bk.Name, method: strategyLabel(st, workers), workers: w}
	j.open = func(context.Context) (func(context.Context) (sample, error), func() error, error) {
		once := func(ctx context.Context) (sample, error) {
			if st == StrategyMapPopulate {
				return mapPopulateRun(size, bk, dev)
			}
			return gmemRun(ctx, size, bk, st, w, dev, touch)
		}
		return once, func() error { return nil }, nil
	}
	return j
}

// registerSlots creates a VM and times registering one memory slot per
// region. It returns the VM, which the caller closes.
func registerSlots(dev *kvm.Device, regions []guestmem.Region) (*kvm.VM, time.Duration, error) {
	vm, err := dev.CreateVM()
	if err != nil {
		return nil, 0, err
	}
	t0 := time.Now()
	for i, r := range regions {
		err := vm.SetSlot(kvm.Slot{ID: uint32(i), GPA: uint64(r.GPA), Size: r.Size, HostAddr: r.HostAddr})
		if err != nil {
			vm.Close()
			return nil, 0, err
		}
	}
	return vm, time.Since(t0), nil
}

// gmemRun is one run of a guestmem strategy.
func gmemRun(ctx context.Context, size units.Size, bk BackingChoice, st string, workers int, dev *kvm.Device,
	touch bool) (s sample, err error) {
	s = sample{register: notApplicable, guestTouch: notApplicable}
	var vm *kvm.VM
	if bk.Backing == guestmem.GuestMemfd {
		// The guest_memfd is made on the VM, which must come first.
		if dev == nil {
			return s, errors.New("the gmem backing needs KVM")
		}
		if vm, err = dev.CreateVM(); err != nil {
			return s, err
		}
	}
	t0 := time.Now()
	m, err := guestmem.New(guestmem.X86Layout(uint64(size)), bk.guestmemOptions(vm)...)
	s.mapT = time.Since(t0)
	if err != nil {
		if vm != nil {
			err = errors.Join(err, vm.Close())
		}
		return s, fmt.Errorf("guestmem.New: %w", err)
	}
	var mach *guest.Machine
	defer func() {
		if mach != nil {
			err = errors.Join(err, mach.Close())
		}
		if vm != nil {
			err = errors.Join(err, vm.Close())
		}
		if m != nil {
			err = errors.Join(err, m.Close())
		}
	}()
	if dev != nil {
		if vm == nil {
			if vm, err = dev.CreateVM(); err != nil {
				return s, err
			}
		}
		t := time.Now()
		if err := m.Register(vm); err != nil {
			return s, fmt.Errorf("KVM registration: %w", err)
		}
		s.register = time.Since(t)
	}
	t1 := time.Now()
	switch st {
	case StrategyNone:
	case StrategyPrefault1, StrategyPrefaultN:
		err = m.Prefault(ctx, guestmem.PrefaultOptions{Workers: workers})
	case StrategyTouch:
		for _, r := range m.Regions() {
			var b []byte
			if b, err = m.Slice(r.GPA, r.Size); err == nil {
				err = touchPages(ctx, b)
			}
			if err != nil {
				break
			}
		}
	default:
		err = fmt.Errorf("unknown strategy %q", st)
	}
	s.prefault = time.Since(t1)
	if st == StrategyNone {
		s.prefault = notApplicable
	}
	if err != nil {
		return s, err
	}
	// What the strategy made resident and huge, before any guest touch.
	if stats, err := m.Stats(); err == nil {
		var huge, res uint64
		for _, r := range stats {
			huge += r.HugePages
			res += r.Resident
		}
		s.huge, s.resident = float64(huge)/float64(size), float64(res)/float64(size)
	}
	if touch && vm != nil {
		if mach, err = guest.New(vm, guest.Config{}); err != nil {
			return s, fmt.Errorf("guest: %w", err)
		}
		if s.guestTouch, err = guestTouch(ctx, mach, m); err != nil {
			return s, fmt.Errorf("guest touch: %w", err)
		}
	}
	if mach != nil {
		err := mach.Close()
		mach = nil
		if err != nil {
			return s, err
		}
	}
	if vm != nil {
		err := vm.Close()
		vm = nil
		if err != nil {
			return s, err
		}
	}
	t2 := time.Now()
	err = m.Close()
	s.teardown = time.Since(t2)
	m = nil
	return s, err
}

// mapPopulateRun is one run of the map-populate strategy. guestmem has no
// MAP_POPULATE option, so this maps the same size and backing directly with
// MAP_POPULATE (through package arena), and registers it as the same x86
// layout's slots. The mmap and the populate are one system call: the whole
// of it is reported as the prefault phase, and there is no separate map
// phase.
func mapPopulateRun(size units.Size, bk BackingChoice, dev *kvm.Device) (s sample, err error) {
	s = sample{mapT: notApplicable, register: notApplicable}
	t0 := time.Now()
	p, err := mapPlain(uint64(size), bk, true)
	s.prefault = time.Since(t0)
	if err != nil {
		return s, fmt.Errorf("mmap(MAP_POPULATE): %w", err)
	}
	defer func() {
		if p != nil {
			err = errors.Join(err, p.close())
		}
	}()
	if dev != nil {
		var regions []guestmem.Region
		off := uintptr(0)
		for _, r := range guestmem.X86Layout(uint64(size)) {
			regions = append(regions, guestmem.Region{GPA: r.GPA, Size: r.Size, HostAddr: p.m.Addr() + off})
			off += uintptr(r.Size)
		}
		vm, d, err := registerSlots(dev, regions)
		if err != nil {
			return s, fmt.Errorf("KVM registration: %w", err)
		}
		s.register = d
		if err := vm.Close(); err != nil {
			return s, err
		}
	}
	s.huge, s.resident = p.hugeFraction()
	t1 := time.Now()
	err = p.close()
	s.teardown = time.Since(t1)
	p = nil
	return s, err
}

// madviseJob is the direct-madvise peer: madvise(MADV_POPULATE_WRITE) from
// workers threads on a plain mapping of the same size and backing, the
// system call guestmem's Prefault makes, without guestmem.
func madviseJob(size units.Size, bk BackingChoice, workers int) job {
	j := job{size: size, backing: bk.Name, method: fmt.Sprintf("madvise x%d", workers), peer: true, workers: workers}
	j.open = func(context.Context) (func(context.Context) (sample, error), func() error, error) {
		once := func(context.Context) (s sample, err error) {
			s = sample{mapT: notApplicable, register: notApplicable, teardown: notApplicable}
			p, err := mapPlain(uint64(size), bk, false)
			if err != nil {
				return s, err
			}
			defer func() { err = errors.Join(err, p.close()) }()
			t0 := time.Now()
			err = populateDirect(p.b, bk.granule(), workers)
			s.prefault = time.Since(t0)
			s.huge, s.resident = p.hugeFraction()
			return s, err
		}
		return once, func() error { return nil }, nil
	}
	return j
}

// memsetJob is the write-bandwidth limit: clearing memory that is already
// populated and already written once, from workers threads. The first
// write by user space to a page the kernel populated can cost extra (a
// hypervisor's shadow-paging fault, on some hosts), so the timed passes
// come after an untimed one.
func memsetJob(size units.Size, bk BackingChoice, workers int) job {
	j := job{size: size, backing: bk.Name, method: fmt.Sprintf("memset x%d", workers), peer: true, workers: workers}
	j.open = func(ctx context.Context) (func(context.Context) (sample, error), func() error, error) {
		p, err := mapPlain(uint64(size), bk, false)
		if err != nil {
			return nil, nil, err
		}
		if err := populateDirect(p.b, bk.granule(), runtime.NumCPU()); err != nil {
			return nil, nil, errors.Join(err, p.close())
		}
		if err := memset(ctx, p.b, runtime.NumCPU()); err != nil {
			return nil, nil, errors.Join(err, p.close())
		}
		huge, res := p.hugeFraction()
		once := func(ctx context.Context) (sample, error) {
			s := sample{mapT: notApplicable, register: notApplicable, teardown: notApplicable, huge: huge,
				resident: res}
			t0 := time.Now()
			err := memset(ctx, p.b, workers)
			s.prefault = time.Since(t0)
			return s, err
		}
		return once, p.close, nil
	}
	return j
}

// guestTouch times a vCPU writing one word into every page of guest RAM,
// region by region (the program is loaded before the timer starts).
func guestTouch(ctx context.Context, mach *guest.Machine, m *guestmem.Memory) (time.Duration, error) {
	entry, err := mach.LoadAsm(guest.FillPages())
	if err != nil {
		return 0, err
	}
	var d time.Duration
	for _, r := range m.Regions() {
		if err := ctx.Err(); err != nil {
			return d, err
		}
		t := time.Now()
		res, err := mach.Call(entry, kvm.Regs{RSI: uint64(r.GPA), RDI: uint64(r.End()), RBX: 4096}, guest.Handlers{})
		d += time.Since(t)
		if err != nil {
			return d, err
		}
		if _, ok := res.Port(guest.PortDone); !ok {
			return d, errors.New("the guest program did not finish")
		}
	}
	return d, nil
}
