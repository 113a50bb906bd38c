package host

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/kvm"
)

// Kernel returns the running kernel as uname(2) names it: system, release
// and machine, such as "Linux 6.18.44 x86_64".
func Kernel() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:]) + " " +
		unix.ByteSliceToString(u.Machine[:]), nil
}

// KVM is what the KVM device offers.
type KVM struct {
	Path       string `json:"path"`
	Present    bool   `json:"present"` // the node exists
	Usable     bool   `json:"usable"`  // opened read-write with the right API version
	APIVersion int    `json:"api_version,omitempty"`
	// Error says why the device is not usable, and what would help (from
	// kvm.Open: for a permission denied, from the node's mode and group),
	// or why its capabilities could not be read.
	Error string   `json:"error,omitempty"`
	Caps  *KVMCaps `json:"capabilities,omitempty"`
}

// KVMCaps are the memory-related KVM capabilities (kvm.Capabilities).
type KVMCaps struct {
	Memslots    int  `json:"memslots"`
	VCPUs       int  `json:"vcpus"`
	ReadonlyMem bool `json:"readonly_mem"`
	UserMemory2 bool `json:"user_memory2"`
	GuestMemfd  bool `json:"guest_memfd"`
	// GuestMemfdFlags are the KVM_CREATE_GUEST_MEMFD flags the kernel
	// takes (KVM_CAP_GUEST_MEMFD_FLAGS), as kvm.GuestMemfdFlags names
	// them: "mmap|init-shared" from Linux 6.18, "none" before.
	GuestMemfdFlags string `json:"guest_memfd_flags"`
	// GuestMemfdMmap says the host may map guest_memfd memory (both
	// flags), which guestmem's GuestMemfd backing needs.
	GuestMemfdMmap    bool `json:"guest_memfd_mmap"`
	ManualDirtyLog    bool `json:"manual_dirty_log"`
	DirtyRingBytes    int  `json:"dirty_ring_bytes"`
	SyncMMU           bool `json:"sync_mmu"`
	MemoryFaultInfo   bool `json:"memory_fault_info"`
	MultiAddressSpace int  `json:"address_spaces"`
}

// gmemShared are the guest_memfd flags a host mapping needs.
const gmemShared = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared

// probeKVM opens the KVM device at path ("" for kvm.DefaultPath) and reads
// its capabilities.
func probeKVM(path string) KVM {
	if path == "" {
		path = kvm.DefaultPath
	}
	r := KVM{Path: path}
	r.Present = kvm.StatNode(path).Exists
	d, err := kvm.Open(path)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	defer d.Close()
	r.Usable, r.APIVersion = true, kvm.APIVersion
	c, err := d.Capabilities()
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.Caps = &KVMCaps{Memslots: c.Memslots, VCPUs: c.VCPUs, ReadonlyMem: c.ReadonlyMem, UserMemory2: c.UserMemory2,
		GuestMemfd: c.GuestMemfd, GuestMemfdFlags: c.GuestMemfdFlags.String(),
		GuestMemfdMmap: c.GuestMemfd && c.GuestMemfdFlags&gmemShared == gmemShared,
		ManualDirtyLog: c.ManualDirtyLog, DirtyRingBytes: c.DirtyRingBytes,
		SyncMMU: c.SyncMMU, MemoryFaultInfo: c.MemoryFaultInfo, MultiAddressSpace: c.MultiAddressSpace}
	return r
}

func memlockLimit() (soft, hard int64, err error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl); err != nil {
		return 0, 0, fmt.Errorf("getrlimit(RLIMIT_MEMLOCK): %w", err)
	}
	conv := func(v uint64) int64 {
		if v == unix.RLIM_INFINITY {
			return -1
		}
		return int64(v)
	}
	return conv(rl.Cur), conv(rl.Max), nil
}

// tryPopulateWrite tries madvise(MADV_POPULATE_WRITE) on a two-page
// mapping. EINVAL means the kernel predates 5.14.
func tryPopulateWrite() error {
	b, err := unix.Mmap(-1, 0, 2*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	defer unix.Munmap(b)
	if err := unix.Madvise(b, unix.MADV_POPULATE_WRITE); err != nil {
		if errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w (Linux 5.14 or later is needed)", err)
		}
		return fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w", err)
	}
	return nil
}

// tryMlockOnFault tries mlock2(MLOCK_ONFAULT), through package arena as
// guestmem's LockOnFault does, on a two-page mapping.
func tryMlockOnFault() error {
	m, err := arena.NewAnon(2*4096, arena.Private())
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.LockOnFault(0, 2*4096); err != nil {
		return err
	}
	return m.Unlock(0, 2*4096)
}
