//go:build amd64

// Package tests is the KVM integration suite: guest code run on /dev/kvm
// through internal/guest, against memory from arena and guestmem.
//
//   - kvm_test.go: the kvm package and the harness — slots, read-only
//     slots, dirty logs, MMIO gaps, memory faults (docs/kvm.md lists them).
//   - guestmem_test.go: guestmem on every backing — guest fills and host
//     checksums, prefault and lock-on-fault seen by the kernel, Register's
//     errors.
//   - dynamic_test.go: a running guest's memory — hotplug while it runs,
//     balloon, dirty tracking of guest and host writes, snapshots restored
//     into a new VM.
//   - vmclose_test.go: closing the VM keeps the dirty log; concurrent
//     registration gets distinct slots.
//   - interop_test.go: a VM made by gokvm, adopted; slots declared.
//   - control_test.go: Kick, RunContext, Pause/Resume and Close of a vCPU
//     spinning in the guest.
//
// The tests skip without a usable /dev/kvm, and fail instead under
// GMEM_REQUIRE_KVM=1 (.ci/run sets it where /dev/kvm exists). Each checks
// at its end that it left no file descriptor or guest mapping behind.
package tests
