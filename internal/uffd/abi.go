//go:build linux

package uffd

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// The kernel's userfaultfd ABI (include/uapi/linux/userfaultfd.h), owned here
// rather than taken from x/sys, which has none of it. The ioctl numbers are
// the generic _IOC encoding, the same on amd64 and arm64.

const (
	uffdAPI = 0xAA // UFFD_API

	// USERFAULTFD_IOC_NEW on /dev/userfaultfd (Linux 6.1): _IO(0xAA, 0x00).
	ioctlNew = 0xAA00

	ioctlAPI        = 0xC018AA3F // _IOWR(0xAA, 0x3F, struct uffdio_api)
	ioctlRegister   = 0xC020AA00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	ioctlUnregister = 0x8010AA01 // _IOR(0xAA, 0x01, struct uffdio_range)
	ioctlWake       = 0x8010AA02 // _IOR(0xAA, 0x02, struct uffdio_range)
	ioctlCopy       = 0xC028AA03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	ioctlZeropage   = 0xC020AA04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
	ioctlPoison     = 0xC020AA08 // _IOWR(0xAA, 0x08, struct uffdio_poison)

	registerModeMissing = 1 << 0 // UFFDIO_REGISTER_MODE_MISSING

	modeDontWake = 1 << 0 // UFFDIO_{COPY,ZEROPAGE,POISON}_MODE_DONTWAKE

	msgSize = 32 // sizeof(struct uffd_msg)

	eventPagefault = 0x12
	eventFork      = 0x13
	eventRemap     = 0x14
	eventRemove    = 0x15
	eventUnmap     = 0x16

	pagefaultFlagWrite = 1 << 0
	pagefaultFlagWP    = 1 << 1
	pagefaultFlagMinor = 1 << 2
)

// Features is a set of UFFD_FEATURE_* bits: what a userfaultfd reports and
// what Open asks for.
type Features uint64

// The features by their kernel names. Open takes the ones this package
// handles:
//
//   - FeatureEventRemove, FeatureEventUnmap, FeatureThreadID and
//     FeatureExactAddress change what the userfaultfd reports (see Event);
//   - FeaturePoison enables Poison and the Poison fallback;
//   - FeatureMissingShmem and FeatureMissingHugetlbfs change nothing but say
//     whether such memory can be registered: requiring them makes Open fail
//     early on a kernel without.
//
// It refuses the others (fs.ErrInvalid): they change how faults are
// delivered (SIGBUS, write-protect, minor faults, fork and remap events) or
// go with ioctls this package does not wrap.
const (
	FeaturePagefaultFlagWP  Features = 1 << 0
	FeatureEventFork        Features = 1 << 1
	FeatureEventRemap       Features = 1 << 2
	FeatureEventRemove      Features = 1 << 3 // Remove events for MADV_DONTNEED and MADV_REMOVE, which then wait until the event is read
	FeatureMissingHugetlbfs Features = 1 << 4 // missing-page faults on hugetlbfs and MFD_HUGETLB memory
	FeatureMissingShmem     Features = 1 << 5 // missing-page faults on shmem (memfd, tmpfs, MAP_SHARED|MAP_ANONYMOUS)
	FeatureEventUnmap       Features = 1 << 6 // Unmap events for munmap, which then waits until the event is read
	FeatureSigbus           Features = 1 << 7
	FeatureThreadID         Features = 1 << 8 // Event.ThreadID is the faulting thread's id
	FeatureMinorHugetlbfs   Features = 1 << 9
	FeatureMinorShmem       Features = 1 << 10
	FeatureExactAddress     Features = 1 << 11 // Event.Addr is the exact faulting address, not rounded down to a page
	FeatureWPHugetlbfsShmem Features = 1 << 12
	FeatureWPUnpopulated    Features = 1 << 13
	FeaturePoison           Features = 1 << 14 // UFFDIO_POISON (Linux 6.6): Poison, and the Poison fallback
	FeatureWPAsync          Features = 1 << 15
	FeatureMove             Features = 1 << 16

	featureKnown   Features = 1<<17 - 1
	featureHandled          = FeatureEventRemove | FeatureMissingHugetlbfs | FeatureMissingShmem |
		FeatureEventUnmap | FeatureThreadID | FeatureExactAddress | FeaturePoison
)

var featureNames = [...]string{
	"PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE",
	"MISSING_HUGETLBFS", "MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS",
	"THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM", "EXACT_ADDRESS",
	"WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
}

// String lists the features by their kernel names, e.g.
// "EVENT_REMOVE|MISSING_SHMEM"; unknown bits are shown in hex.
func (f Features) String() string {
	if f == 0 {
		return "none"
	}
	var names []string
	for i, name := range featureNames {
		if f&(1<<i) != 0 {
			names = append(names, name)
		}
	}
	if rest := f &^ featureKnown; rest != 0 {
		names = append(names, fmt.Sprintf("%#x", uint64(rest)))
	}
	return strings.Join(names, "|")
}

// Ioctls is the set of ioctls the kernel supports on a userfaultfd or on a
// registered range, as reported by UFFDIO_API and UFFDIO_REGISTER: bit n is
// the ioctl numbered n.
type Ioctls uint64

// The ioctls of a registered range, as reported by Register. Hugetlb memory
// has no ZeroPage (ZeroPage and the ZeroFill fallback copy zeros there
// instead).
const (
	IoctlWake         Ioctls = 1 << 0x02
	IoctlCopy         Ioctls = 1 << 0x03
	IoctlZeroPage     Ioctls = 1 << 0x04
	IoctlMove         Ioctls = 1 << 0x05
	IoctlWriteProtect Ioctls = 1 << 0x06
	IoctlContinue     Ioctls = 1 << 0x07
	IoctlPoison       Ioctls = 1 << 0x08
)

var ioctlNames = map[int]string{
	0x00: "REGISTER", 0x01: "UNREGISTER", 0x02: "WAKE", 0x03: "COPY", 0x04: "ZEROPAGE",
	0x05: "MOVE", 0x06: "WRITEPROTECT", 0x07: "CONTINUE", 0x08: "POISON", 0x3F: "API",
}

// String lists the ioctls by name, e.g. "WAKE|COPY|ZEROPAGE".
func (io Ioctls) String() string {
	if io == 0 {
		return "none"
	}
	var names []string
	for i := range 64 {
		if io&(1<<i) == 0 {
			continue
		}
		if name, ok := ioctlNames[i]; ok {
			names = append(names, name)
		} else {
			names = append(names, fmt.Sprintf("ioctl%#x", i))
		}
	}
	return strings.Join(names, "|")
}

// decodeMsg decodes one struct uffd_msg (32 bytes, packed, host byte order).
func decodeMsg(b []byte) Event {
	le := binary.NativeEndian
	switch kind := b[0]; kind {
	case eventPagefault:
		flags := le.Uint64(b[8:])
		return Event{
			Kind:     PageFault,
			Addr:     uintptr(le.Uint64(b[16:])),
			Flags:    FaultFlags(flags),
			ThreadID: int(le.Uint32(b[24:])),
		}
	case eventRemove:
		return Event{Kind: Remove, Start: uintptr(le.Uint64(b[8:])), End: uintptr(le.Uint64(b[16:]))}
	case eventUnmap:
		return Event{Kind: Unmap, Start: uintptr(le.Uint64(b[8:])), End: uintptr(le.Uint64(b[16:]))}
	case eventRemap, eventFork:
		// Never asked for (Open refuses those features); named, not decoded.
		return Event{Kind: Kind(kind)}
	default:
		return Event{Kind: Kind(kind)}
	}
}
