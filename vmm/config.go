//go:build amd64

package vmm

import (
	"fmt"
	"io"
	"strings"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// Config is what New builds a VM from, and what Restore needs besides the
// snapshot.
type Config struct {
	// Kernel is the kernel image: a vmlinux with a PVH note (booted in
	// 32-bit protected mode, quickest) or a bzImage (the 64-bit boot
	// protocol; its decompressor runs in the guest). boot.Load tells them
	// apart. Required by New; Restore takes the kernel from the snapshot and
	// refuses one here.
	Kernel io.ReaderAt
	// Initrd is an initrd (initramfs) of InitrdSize bytes, or nil.
	Initrd     io.ReaderAt
	InitrdSize int64
	// Cmdline is the kernel command line. DefaultCmdline gives the kernel a
	// console on the serial port; on KVM without hardware virtualization
	// add EmulatorCmdline.
	Cmdline string

	// Size is the guest's RAM in bytes, a positive multiple of 2 MiB, laid
	// out as guestmem.X86Layout does: up to 3 GiB from address 0, the rest
	// from 4 GiB, with the PCI hole between. 0 means DefaultSize, unless
	// Layout is given. Give Size or Layout, not both. For Restore either is
	// optional, and checks the snapshot's layout.
	Size uint64
	// Layout lays out guest RAM explicitly. It must leave the PCI hole
	// [3 GiB, 4 GiB) empty (boot.MemoryMap checks).
	Layout guestmem.Layout
	// MemoryOptions are passed to guestmem.New (or guestmem.Restore): the
	// backing (default anonymous memory; guestmem.WithBacking(guestmem.Memfd)
	// to share it), hugepages, a name, ...
	MemoryOptions []guestmem.Option

	// Console receives what the guest writes to its serial port, COM1. nil
	// discards it. It is written from the goroutine calling Run, one call at
	// a time, and its errors are ignored: a guest does not wait for its
	// console.
	Console io.Writer

	// EmulatorWorkarounds steps over the instructions KVM's instruction
	// emulator lacks that Linux uses: int3 (delivered as the breakpoint
	// exception it would raise), clac and stac (done by setting RFLAGS.AC),
	// fwait (a no-op here). It is a workaround for hosts without hardware
	// virtualization, where the emulator runs every guest instruction;
	// leave it off elsewhere, where these never reach the VMM. Off by
	// default: without it such an instruction ends Run with an
	// *EmulationError.
	EmulatorWorkarounds bool

	// KVMPath is the KVM device; "" means /dev/kvm.
	KVMPath string
}

// Defaults.
const (
	// DefaultSize is the guest RAM New gives when neither Size nor Layout
	// is set: 256 MiB.
	DefaultSize = 256 << 20
	// DefaultCmdline gives the kernel its console on the serial port the
	// VMM models (COM1 at 0x3f8), from its first messages
	// (earlyprintk) on, and makes a panic reboot at once (panic=-1),
	// which ends Run with a *StopError.
	DefaultCmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1"
	// EmulatorCmdline is what to add to the command line on KVM without
	// hardware virtualization, where KVM's instruction emulator runs every
	// guest instruction (measured in docs/vmm.md): it keeps the kernel
	// from instructions the emulator lacks (noxsave; clearcpuid, since
	// KVM_SET_CPUID2 does not restrict the CPUID such a guest sees) and
	// skips work that takes minutes there (the initcall blacklist, the
	// crypto self-tests, mitigations).
	EmulatorCmdline = "nokaslr noxsave mitigations=off cryptomgr.notests tsc=reliable nosoftlockup " +
		"clearcpuid=erms,fsrm,ssse3,sse4_1,sse4_2,pclmulqdq,aes,smap,popcnt " +
		"initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,event_trace_init,tracer_init_tracefs"
)

// sizeAlign is the granularity of Config.Size: 2 MiB, so that guest RAM can
// be backed by transparent hugepages or a 2 MiB hugetlb pool throughout.
const sizeAlign = 2 << 20

// Validate checks c as New does, before anything is allocated: a kernel is
// given; an initrd comes with its size; the command line has no NUL byte and
// fits the command-line area; Size is a multiple of 2 MiB, or Layout a valid
// layout with the PCI hole empty, not both. Each problem is a *ConfigError.
func (c Config) Validate() error {
	if c.Kernel == nil {
		return &ConfigError{Field: "Kernel", Problem: "nil: New needs a kernel image"}
	}
	if err := c.validateInitrd(); err != nil {
		return err
	}
	if err := c.validateCmdline(); err != nil {
		return err
	}
	_, err := c.layout(true)
	return err
}

func (c Config) validateInitrd() error {
	switch {
	case c.Initrd != nil && c.InitrdSize <= 0:
		return &ConfigError{Field: "InitrdSize", Problem: fmt.Sprintf("%d: an Initrd needs its size in bytes", c.InitrdSize)}
	case c.Initrd == nil && c.InitrdSize != 0:
		return &ConfigError{Field: "InitrdSize", Problem: fmt.Sprintf("%d without an Initrd", c.InitrdSize)}
	}
	return nil
}

func (c Config) validateCmdline() error {
	if i := strings.IndexByte(c.Cmdline, 0); i >= 0 {
		return &ConfigError{Field: "Cmdline", Problem: fmt.Sprintf("a NUL byte at offset %d", i)}
	}
	if len(c.Cmdline) > boot.CmdlineMax-1 {
		return &ConfigError{Field: "Cmdline", Problem: fmt.Sprintf("%d bytes, more than the %d the command-line area holds",
			len(c.Cmdline), boot.CmdlineMax-1)}
	}
	return nil
}

// validateRestore checks c for Restore: no kernel, initrd or command line
// (they are in the snapshot), and Size or Layout as for New if given.
func (c Config) validateRestore() error {
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"Kernel", c.Kernel != nil}, {"Initrd", c.Initrd != nil}, {"InitrdSize", c.InitrdSize != 0},
		{"Cmdline", c.Cmdline != ""},
	} {
		if f.set {
			return &ConfigError{Field: f.name, Problem: "set for Restore, which takes the kernel and what was loaded with it from the snapshot"}
		}
	}
	_, err := c.layout(false)
	return err
}

// layout returns the guest's layout: Layout, X86Layout(Size), or, when
// neither is set, X86Layout(DefaultSize) for New (orDefault) and nil for
// Restore.
func (c Config) layout(orDefault bool) (guestmem.Layout, error) {
	switch {
	case c.Size != 0 && c.Layout != nil:
		return nil, &ConfigError{Field: "Size", Problem: "set together with Layout: give one of them"}
	case c.Layout != nil:
		if err := c.Layout.Validate(4096, guestmem.MaxGuestAddress); err != nil {
			return nil, &ConfigError{Field: "Layout", Problem: "not a valid layout", Err: err}
		}
		if _, err := boot.MemoryMap(c.Layout); err != nil {
			return nil, &ConfigError{Field: "Layout", Problem: "not bootable", Err: err}
		}
		return c.Layout, nil
	case c.Size != 0:
		if c.Size%sizeAlign != 0 {
			return nil, &ConfigError{Field: "Size", Problem: fmt.Sprintf("%d bytes: not a multiple of 2 MiB", c.Size)}
		}
		l := guestmem.X86Layout(c.Size)
		if err := l.Validate(4096, guestmem.MaxGuestAddress); err != nil {
			return nil, &ConfigError{Field: "Size", Problem: fmt.Sprintf("%d bytes: too large for the guest address space", c.Size), Err: err}
		}
		return l, nil
	case orDefault:
		return guestmem.X86Layout(DefaultSize), nil
	}
	return nil, nil
}

func (c Config) kvmPath() string {
	if c.KVMPath == "" {
		return kvm.DefaultPath
	}
	return c.KVMPath
}

func (c Config) console() io.Writer {
	if c.Console == nil {
		return io.Discard
	}
	return c.Console
}
