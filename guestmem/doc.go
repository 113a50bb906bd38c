// Package guestmem is a guest's physical memory: a layout of regions,
// backed by private anonymous memory, one shared memfd (crosvm's model), a
// hugetlb memfd or an existing file, placed in one arena.Arena with guard
// gaps between regions, and addressed by guest-physical address.
//
// Every access checks its whole guest-physical range before touching memory:
// a guest chooses the addresses devices are asked to read and write, so an
// address in a hole, or an address plus length that overflows, is an
// *AddressError and never an access outside guest RAM.
//
// Memory policy (Prefetch, DropPageCache, LockOnFault, Unlock,
// UseHugepages, NoHugepages) applies to the whole guest or to
// guest-physical spans, and Prefault populates guest RAM in parallel before
// the guest runs.
//
// Register gives each region a KVM memory slot. A running guest's memory can
// grow and shrink (AddRegion, RemoveRegion: the region table is replaced
// atomically, and readers never lock it), give pages back to the host
// (Discard), be tracked for dirty pages (the union of KVM's dirty log and
// guestmem's own writes), and be saved to and restored from a checksummed
// snapshot stream (Save, Restore, RestoreLazy, Verify), whose format
// docs/guestmem.md specifies.
package guestmem
