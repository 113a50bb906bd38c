//go:build amd64

package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// VM is a running machine: guest memory, a KVM VM with one vCPU, the
// in-kernel interrupt controllers and PIT, and a serial port. New boots one
// from a kernel, Restore from a snapshot; Run runs it; Close releases it.
//
// Its methods may be called from any goroutine. Run runs the guest on the
// calling goroutine, one Run at a time; Kick, Pause, Resume, Save, Stats
// and Close may be called while it runs.
type VM struct {
	cfg     Config
	console io.Writer
	mem     *guestmem.Memory
	dev     *kvm.Device
	kvm     *kvm.VM
	cpu     *kvm.VCPU
	entry   *boot.Entry
	uart    uart

	// The VM's and the vCPU's descriptors, borrowed from kvm and cpu for
	// the ioctls neither package issues (ioctl_unsafe.go). fdMu keeps Close
	// from closing them under an ioctl in flight, whose descriptor number
	// could otherwise be reused by another file.
	fdMu      sync.RWMutex
	fdsClosed bool
	vmFD      uintptr
	cpuFD     uintptr
	caps      machineCaps

	runMu     sync.Mutex  // held by Run
	looping   atomic.Bool // Run is serving exits
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error

	stats stats
}

// New builds and boots a VM from cfg, in this order: guest memory
// (guestmem.New, as Size or Layout and MemoryOptions say), the kernel loaded
// into it (boot.Load, with the initrd and command line), then the machine —
// KVM opened at KVMPath, a VM created with gokvm's kvm package on the
// device's descriptor and given what a kernel needs that the kvm package
// does not wrap (the TSS and identity-map addresses, the in-kernel irqchip,
// the PIT), then adopted by the kvm package (Device.Adopt, Owned), guest
// memory registered with it (guestmem.Register), vCPU 0 created with
// KVM's supported CPUID, normalized (normalizeCPUID), and its registers set
// to the kernel's entry point (boot.Entry). The VM is ready for Run.
//
// cfg is checked first (Config.Validate: a *ConfigError). On any later
// error everything made so far is released before New returns.
func New(cfg Config) (*VM, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	layout, _ := cfg.layout(true)
	v := newVM(cfg)
	ok := false
	defer func() {
		if !ok {
			v.Close()
		}
	}()
	var err error
	if v.mem, err = guestmem.New(layout, cfg.MemoryOptions...); err != nil {
		return nil, fmt.Errorf("creating guest memory: %w", err)
	}
	v.entry, err = boot.Load(v.mem, cfg.Kernel, boot.Options{Cmdline: cfg.Cmdline, Initrd: cfg.Initrd,
		InitrdSize: cfg.InitrdSize})
	if err != nil {
		return nil, fmt.Errorf("loading the kernel: %w", err)
	}
	if err := v.newMachine(); err != nil {
		return nil, err
	}
	sregs, err := v.cpu.Sregs()
	if err != nil {
		return nil, err
	}
	if err := v.cpu.SetSregs(v.entry.Sregs(sregs)); err != nil {
		return nil, err
	}
	if err := v.cpu.SetRegs(v.entry.Regs); err != nil {
		return nil, err
	}
	ok = true
	return v, nil
}

func newVM(cfg Config) *VM {
	v := &VM{cfg: cfg, console: cfg.console()}
	v.uart.setIRQ = v.setIRQLine
	return v
}

// Run runs the guest on the calling goroutine, serving its exits, until
//
//   - ctx ends: Run returns context.Cause(ctx) (the vCPU is kicked out of
//     the guest at once: kvm.VCPU.RunContext);
//   - Kick is called: Run returns nil, with the guest stopped where it was;
//     Run again continues it;
//   - the guest stops itself (a reset, a shutdown): a *StopError
//     (ErrGuestStopped);
//   - Close: an error wrapping ErrClosed;
//   - anything else goes wrong: an instruction KVM cannot emulate (an
//     *EmulationError; see Config.EmulatorWorkarounds), a guest memory
//     fault (a *kvm.MemoryFaultError), a failing ioctl.
//
// While the VM is paused, Run waits inside for Resume. The exits it serves:
// port I/O to COM1 (0x3f8–0x3ff, the UART model, whose output goes to
// Config.Console); a reset request (0xfe to port 0x64, the reset bit to
// 0xcf9), which ends Run; every other port and MMIO address reads all ones,
// as an empty bus does, and ignores writes (the PIC, PIT and LAPIC are in
// the kernel and never exit). A second Run while one is in progress returns
// ErrRunning.
func (v *VM) Run(ctx context.Context) error {
	if !v.runMu.TryLock() {
		return fmt.Errorf("vmm: Run: %w", ErrRunning)
	}
	defer v.runMu.Unlock()
	if v.closed.Load() {
		return fmt.Errorf("vmm: Run: %w", ErrClosed)
	}
	v.looping.Store(true)
	defer v.looping.Store(false)
	for {
		e, err := v.cpu.RunContext(ctx)
		if err != nil {
			if e.Reason == kvm.ExitIntr && ctx.Err() != nil {
				return err // context.Cause(ctx)
			}
			return fmt.Errorf("running the guest: %w", err)
		}
		v.stats.exits.Add(1)
		if done, err := v.serve(e); done || err != nil {
			return err
		}
	}
}

// serve handles one exit; done says Run returns.
func (v *VM) serve(e kvm.Exit) (done bool, err error) {
	switch e.Reason {
	case kvm.ExitIntr: // Kick
		return true, nil
	case kvm.ExitIO:
		v.stats.ioExits.Add(1)
		err := v.io(e.IO)
		return err != nil, err
	case kvm.ExitMMIO:
		v.stats.mmioExits.Add(1)
		if !e.MMIO.Write {
			for i := range e.MMIO.Data {
				e.MMIO.Data[i] = 0xff
			}
		}
		return false, nil
	case kvm.ExitHLT:
		return true, v.stopped("halt")
	case kvm.ExitShutdown:
		return true, v.stopped("shutdown")
	case kvm.ExitInternalError:
		const emulation = 1 // KVM_INTERNAL_ERROR_EMULATION
		if e.Suberror != emulation {
			return true, fmt.Errorf("vmm: KVM internal error, suberror %d, at rip %#x", e.Suberror, v.rip())
		}
		err := v.emulationFailure()
		return err != nil, err
	case kvm.ExitFailEntry:
		return true, fmt.Errorf("vmm: KVM could not enter the guest: hardware entry failure reason %#x", e.HardwareReason)
	}
	return true, fmt.Errorf("vmm: unexpected exit %v at rip %#x", e, v.rip())
}

func (v *VM) stopped(reason string) error { return &StopError{Reason: reason, RIP: v.rip()} }

func (v *VM) rip() uint64 {
	r, _ := v.cpu.Regs()
	return r.RIP
}

// Kick makes a Run in progress return nil promptly, the guest stopped where
// it was (VCPU().Regs() says where); if none is in progress, the next Run
// returns at once. Run again to continue. A kick does not reach a Run
// waiting in a paused VM until Resume.
func (v *VM) Kick() {
	if v.cpu != nil {
		v.cpu.Kick()
	}
}

// Pause stops the guest and returns when its vCPU is out of the guest and
// the exit it last made has been served (Run then waits inside for Resume),
// or when ctx ends (the VM stays paused: call Resume). Guest memory is then
// still and the registers can be read. Pausing a VM that is not running
// returns at once, and a Run started later waits.
func (v *VM) Pause(ctx context.Context) error {
	if v.closed.Load() {
		return fmt.Errorf("vmm: Pause: %w", ErrClosed)
	}
	if err := v.kvm.Pause(ctx); err != nil {
		return err
	}
	// Pause returns once the vCPU left the guest; the exit loop may still
	// be serving the exit it came back with. It is done when it is back in
	// RunContext, waiting for Resume (StatePaused), or has returned.
	tick := time.NewTicker(100 * time.Microsecond)
	defer tick.Stop()
	for v.looping.Load() && v.cpu.State() != kvm.StatePaused {
		select {
		case <-ctx.Done():
			return fmt.Errorf("vmm: Pause: the exit loop is still serving an exit: %w", context.Cause(ctx))
		case <-tick.C:
		}
	}
	return nil
}

// Resume lets a paused VM run again. Resuming a VM that is not paused does
// nothing.
func (v *VM) Resume() {
	if v.kvm != nil && !v.closed.Load() {
		v.kvm.Resume()
	}
}

// Paused reports whether the VM is paused.
func (v *VM) Paused() bool { return v.kvm != nil && !v.closed.Load() && v.kvm.Paused() }

// Close releases everything the VM holds: the vCPU (kicking a Run in
// progress out of the guest; it returns ErrClosed), the VM, guest memory,
// the KVM device. It does not wait for Run to return. Closing twice returns
// the first Close's result. It is also what New and Restore call when they
// fail part way.
func (v *VM) Close() error {
	v.closeOnce.Do(func() {
		v.closed.Store(true)
		var errs []error
		v.fdMu.Lock()
		v.fdsClosed = true
		if v.cpu != nil {
			// The vCPU first, which kicks it out of the guest and waits
			// for KVM_RUN to return: the guest must not run while its
			// memory goes.
			errs = append(errs, v.cpu.Close())
		}
		if v.kvm != nil {
			// The VM runs the memory's OnClose first: its slots go before
			// the memory is unmapped below.
			errs = append(errs, v.kvm.Close())
		}
		v.fdMu.Unlock()
		if v.mem != nil {
			errs = append(errs, v.mem.Close())
		}
		if v.dev != nil {
			errs = append(errs, v.dev.Close())
		}
		v.closeErr = errors.Join(errs...)
	})
	return v.closeErr
}

// Memory returns the guest's memory. It belongs to the VM, which closes it.
func (v *VM) Memory() *guestmem.Memory { return v.mem }

// KVM returns the KVM VM, for what a VMM adds (more devices, an irqfd: its
// FD is gokvm's way in). It belongs to the VM.
func (v *VM) KVM() *kvm.VM { return v.kvm }

// VCPU returns vCPU 0: its registers (Regs, Sregs), its state, its FD.
func (v *VM) VCPU() *kvm.VCPU { return v.cpu }

// Entry returns where New loaded the kernel and how it entered it; nil for
// a restored VM.
func (v *VM) Entry() *boot.Entry { return v.entry }

// Stats is what the exit loop has done.
type Stats struct {
	Exits        uint64            // exits served, of every kind
	IOExits      uint64            // port I/O exits
	MMIOExits    uint64            // MMIO exits
	ConsoleBytes uint64            // bytes the guest wrote to COM1
	Workarounds  map[string]uint64 // emulator workarounds applied, by instruction (Config.EmulatorWorkarounds)
}

// Stats returns the VM's counters.
func (v *VM) Stats() Stats {
	v.stats.mu.Lock()
	defer v.stats.mu.Unlock()
	return Stats{Exits: v.stats.exits.Load(), IOExits: v.stats.ioExits.Load(), MMIOExits: v.stats.mmioExits.Load(),
		ConsoleBytes: v.stats.consoleBytes.Load(), Workarounds: maps.Clone(v.stats.workarounds)}
}

type stats struct {
	exits, ioExits, mmioExits, consoleBytes atomic.Uint64
	mu                                      sync.Mutex
	workarounds                             map[string]uint64
}

func (s *stats) workaround(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.workarounds == nil {
		s.workarounds = map[string]uint64{}
	}
	s.workarounds[name]++
}
