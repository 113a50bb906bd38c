//go:build amd64

// Package vmm is a small virtual machine monitor built from gmem's packages:
// it boots a Linux kernel on KVM with one vCPU and a serial console, and
// saves and restores the running machine. It is the VMM docs/vmm.md walks
// through, the one examples/firstvmm and `gmem boot` run, and a starting
// point to copy.
//
// New builds a VM from a Config: guest memory (guestmem), the kernel loaded
// into it (boot), a VM created with gokvm's kvm package and adopted by
// gmem's (kvm.Device.Adopt), with the in-kernel interrupt controllers and
// PIT, the memory registered, and vCPU 0 at the kernel's entry point. Run
// is the exit loop: it serves COM1 (an 8250/16550A model whose output goes
// to Config.Console), answers every other port and MMIO address as an
// empty bus does, and returns when its context ends, on Kick, when the
// guest resets or shuts down (*StopError), or on an error. Pause stops the
// guest and Resume lets it go on; Save writes a snapshot (a state record
// of the vCPU, the interrupt controllers, the PIT, kvm-clock and the UART,
// then guest memory), and Restore makes a new VM from one. Close releases
// everything.
//
// On hosts without hardware virtualization KVM runs every guest instruction
// in its instruction emulator, which lacks a few that Linux uses:
// Config.EmulatorWorkarounds and EmulatorCmdline are the workarounds, off by
// default.
//
// The machine is deliberately small: one vCPU, no ACPI, no PCI, no block or
// network device, no serial input. docs/vmm.md says what each part does
// and how to add more.
package vmm
