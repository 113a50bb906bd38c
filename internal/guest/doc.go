//go:build amd64

// Package guest runs tiny x86-64 guest programs on KVM, for the
// integration tests and the gmem demo.
//
// Asm assembles the few instructions the programs need, all plain ones
// every instruction emulator has: mov (register, immediate, load, store),
// add, xor, cmp, dec, shr, jmp, jcc, in, out, hlt. Labels may be used
// before they are defined.
//
// A Machine is one vCPU of a VM in 64-bit long mode. Its page tables
// identity-map guest-physical memory from 0 with 2 MiB pages (64 GiB by
// default), and live, with a GDT, a TSS, the loaded programs and a stack,
// in a 2 MiB system slot of their own (at 0xFFC00000 by default). The slot
// is never dirty-logged, so the accessed and dirty bits the guest CPU sets
// in its page tables never show in a RAM slot's dirty log, and RAM slots
// can be moved, deleted or made read-only without breaking the guest's
// ability to run. Machine.Call runs a program until it halts, recording
// its port writes and MMIO exits.
//
// The standard programs (FillPages, SumPages, VerifyPages, Poll, Store,
// Load) touch one quadword per page and report on I/O ports (PortLo,
// PortHi, PortFail, PortDone). On hosts where KVM emulates every guest
// instruction, about a million a second, that keeps a pass over 256 MiB
// under a second.
package guest
