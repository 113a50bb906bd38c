// Package vhostuser hands guest memory to a vhost-user device back end, a
// separate process that must map guest RAM, in the wire format of the
// vhost-user specification (QEMU's docs/interop/vhost-user.rst).
//
// The front end — the VMM owning a guestmem.Memory — opens a session with
// NewFrontend or Dial, and Export sends the region table: for each region,
// its guest-physical address, size, this process's address of it and its
// offset in the memory's memfd, with the fd as SCM_RIGHTS ancillary data
// (SET_MEM_TABLE, or ADD_MEM_REG per region). Exporter.AddRegion and
// RemoveRegion hot-add and remove regions on both sides (ADD_MEM_REG and
// REM_MEM_REG, or a new SET_MEM_TABLE without CONFIGURE_MEM_SLOTS), in the
// order that keeps the back end from touching released memory.
// Exporter.EnableDirtyLog shares a dirty log (SET_LOG_BASE with a memfd):
// one bit per 4 KiB guest page from address 0, which the back end sets
// atomically as it writes and which guestmem's CollectDirty and Save merge.
// Private memory (guestmem.Anonymous, File) cannot be shared and is
// refused with ErrNotShareable.
//
// The back end's side is here too, for tests and Go device back ends:
// Backend answers the session and memory requests and maps what it is
// sent into a MemoryMap, which translates guest-physical addresses to this
// process's memory and logs writes in the shared log. Every message is
// checked before use: a malformed one is an error wrapping ErrMalformed
// (a *ProtocolError), never a crash.
//
// All integers are in the host's byte order, as the specification says.
// docs/vhostuser.md describes the messages byte by byte.
package vhostuser
