package kvm

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// GuestMemfdFlags are the flags of KVM_CREATE_GUEST_MEMFD
// (GUEST_MEMFD_FLAG_*), and the answer of KVM_CAP_GUEST_MEMFD_FLAGS: the
// flags the kernel takes.
type GuestMemfdFlags uint64

const (
	// GuestMemfdMmap lets the host map the guest_memfd (mmap MAP_SHARED;
	// GUEST_MEMFD_FLAG_MMAP, Linux 6.18). Without it the memory is
	// reachable only by the guest.
	GuestMemfdMmap GuestMemfdFlags = 1 << 0
	// GuestMemfdInitShared makes the memory shared between host and
	// guest from the start (GUEST_MEMFD_FLAG_INIT_SHARED), which a host
	// mapping of a VM without private memory (the default x86 VM type)
	// needs.
	GuestMemfdInitShared GuestMemfdFlags = 1 << 1
)

// String names the flags: "mmap", "init-shared", joined by "|", unknown
// bits in hex, or "none".
func (f GuestMemfdFlags) String() string {
	var s []string
	if f&GuestMemfdMmap != 0 {
		s = append(s, "mmap")
	}
	if f&GuestMemfdInitShared != 0 {
		s = append(s, "init-shared")
	}
	if rest := f &^ (GuestMemfdMmap | GuestMemfdInitShared); rest != 0 {
		s = append(s, fmt.Sprintf("%#x", uint64(rest)))
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, "|")
}

// ErrGuestMemfd is wrapped by the errors of what KVM does not do with
// guest_memfd memory, refused before the kernel sees it: dirty logging or
// read-only slots on it, changing such a slot in place (KVM only creates
// and deletes them), a guest_memfd of another VM or one already closed,
// flags the kernel does not take (also ErrUnsupported). The message names
// the limit.
var ErrGuestMemfd = errors.New("kvm: not possible with guest_memfd memory")

// GuestMemfd is guest memory created by KVM for one VM
// (KVM_CREATE_GUEST_MEMFD): a file of fixed size, with no read or write
// calls (pread and pwrite fail with ESPIPE), that only that VM's slots may
// use (Slot.GuestMemfd), and that the host maps with MAP_SHARED when it was
// created with GuestMemfdMmap. The kernel object lives until the
// descriptor is closed and no slot or mapping uses it. It is safe for
// concurrent use.
type GuestMemfd struct {
	vm    *VM
	size  uint64
	flags GuestMemfdFlags

	mu sync.RWMutex
	f  *os.File // nil once closed
}

// Check returns KVM_CHECK_EXTENSION for c on the VM's descriptor, which
// answers for this VM where the answer depends on the VM type (the
// guest_memfd flags do).
func (vm *VM) Check(c Cap) (int, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return 0, fmt.Errorf("kvm: checking %v: %w", c, errVMClosed)
	}
	n, err := retry(func() (uintptr, error) { return gokvm.CheckExtension(vm.f.Fd(), gokvm.Capability(c)) })
	if err != nil {
		return 0, fmt.Errorf("kvm: checking %v: %w", c, ioctlErr("KVM_CHECK_EXTENSION", err))
	}
	return int(n), nil
}

// GuestMemfdFlags returns the KVM_CREATE_GUEST_MEMFD flags this VM takes
// (KVM_CAP_GUEST_MEMFD_FLAGS on the VM): GuestMemfdMmap|GuestMemfdInitShared
// on a default VM from Linux 6.18, none on older kernels (and none without
// KVM_CAP_GUEST_MEMFD).
func (vm *VM) GuestMemfdFlags() (GuestMemfdFlags, error) {
	if !vm.caps.GuestMemfd {
		return 0, nil
	}
	n, err := vm.Check(CapGuestMemfdFlags)
	if err != nil {
		return 0, err
	}
	return GuestMemfdFlags(n), nil
}

// CreateGuestMemfd creates size bytes of guest_memfd memory for this VM
// (KVM_CREATE_GUEST_MEMFD). size must be a nonzero multiple of the page
// size (ErrSlotUnaligned, ErrSlotSize) and is fixed for good: the kernel
// refuses ftruncate, so room for memory added later must be part of it.
// Flags the VM does not take (GuestMemfdFlags) are ErrGuestMemfd and
// ErrUnsupported; no guest_memfd support at all is ErrUnsupported. The
// descriptor is close-on-exec.
func (vm *VM) CreateGuestMemfd(size uint64, flags GuestMemfdFlags) (*GuestMemfd, error) {
	const op = "kvm: CreateGuestMemfd"
	if size == 0 {
		return nil, fmt.Errorf("%s: %w: size 0", op, ErrSlotSize)
	}
	if size%pageSize != 0 {
		return nil, fmt.Errorf("%s: %w: size %#x is not a multiple of the page size", op, ErrSlotUnaligned, size)
	}
	if !vm.caps.GuestMemfd || !vm.caps.UserMemory2 {
		return nil, fmt.Errorf("%s: %w: KVM_CAP_GUEST_MEMFD and KVM_CAP_USER_MEMORY2 (Linux 6.8) are needed", op,
			ErrUnsupported)
	}
	have, err := vm.GuestMemfdFlags()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if flags&^have != 0 {
		return nil, fmt.Errorf("%s: %w: flags %v, but this VM takes only %v (KVM_CAP_GUEST_MEMFD_FLAGS; host "+
			"mapping needs Linux 6.18): %w", op, ErrGuestMemfd, flags, have, ErrUnsupported)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return nil, fmt.Errorf("%s: %w", op, errVMClosed)
	}
	// The kernel does not make the descriptor close-on-exec: hold fork off
	// until it is, as package syscall does for its own descriptors.
	syscall.ForkLock.RLock()
	fd, err := createGuestMemfd(vm.f.Fd(), size, uint64(flags))
	if err == nil {
		unix.CloseOnExec(fd)
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("%s: %#x bytes, flags %v: %w", op, size, flags,
			ioctlErr("KVM_CREATE_GUEST_MEMFD", err))
	}
	return &GuestMemfd{vm: vm, size: size, flags: flags, f: os.NewFile(uintptr(fd), "kvm-gmem")}, nil
}

// Size returns the guest_memfd's size in bytes.
func (g *GuestMemfd) Size() uint64 { return g.size }

// Flags returns the flags it was created with.
func (g *GuestMemfd) Flags() GuestMemfdFlags { return g.flags }

// VM returns the VM it belongs to: the only one whose slots may use it.
func (g *GuestMemfd) VM() *VM { return g.vm }

// FD returns its descriptor, for mmap (MAP_SHARED, with GuestMemfdMmap),
// fallocate, or handing to another process; -1 after Close. It stays owned
// by the GuestMemfd.
func (g *GuestMemfd) FD() int {
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.f == nil {
		return -1
	}
	return int(g.f.Fd())
}

// Close closes the descriptor. Slots and mappings using the memory keep it
// alive in the kernel until they go. Closing twice returns nil.
func (g *GuestMemfd) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.f == nil {
		return nil
	}
	err := g.f.Close()
	g.f = nil
	return err
}

// checkGuestMemfd checks the guest_memfd part of s for check.
func (vm *VM) checkGuestMemfd(s Slot) error {
	g := s.GuestMemfd
	if g == nil {
		if s.Flags&GuestMemfdSlot != 0 {
			return fmt.Errorf("%w: GuestMemfdSlot without a GuestMemfd", ErrSlotFlags)
		}
		if s.GuestMemfdOffset != 0 {
			return fmt.Errorf("%w: a guest_memfd offset without a GuestMemfd", ErrSlotFlags)
		}
		return nil
	}
	switch {
	case !vm.caps.UserMemory2 || !vm.caps.GuestMemfd:
		return fmt.Errorf("%w: guest_memfd slots need KVM_CAP_USER_MEMORY2 and KVM_CAP_GUEST_MEMFD", ErrUnsupported)
	case g.vm != vm:
		return fmt.Errorf("%w: the guest_memfd belongs to another VM, and KVM binds it to that one", ErrGuestMemfd)
	case g.FD() < 0:
		return fmt.Errorf("%w: the guest_memfd is closed", ErrGuestMemfd)
	case s.Flags&LogDirtyPages != 0:
		return fmt.Errorf("%w: %w: KVM keeps no dirty log of guest_memfd slots (KVM_MEM_LOG_DIRTY_PAGES is refused)",
			ErrSlotFlags, ErrGuestMemfd)
	case s.Flags&ReadOnly != 0:
		return fmt.Errorf("%w: %w: guest_memfd slots cannot be read-only (KVM_MEM_READONLY is refused)",
			ErrSlotFlags, ErrGuestMemfd)
	case s.GuestMemfdOffset%pageSize != 0:
		return fmt.Errorf("%w: guest_memfd offset %#x", ErrSlotUnaligned, s.GuestMemfdOffset)
	case s.GuestMemfdOffset > g.size || s.Size > g.size-s.GuestMemfdOffset:
		return fmt.Errorf("%w: guest_memfd [%#x, +%#x) is past its end (%#x bytes)", ErrSlotSize, s.GuestMemfdOffset,
			s.Size, g.size)
	}
	for _, o := range vm.byGPA {
		if o.ID != s.ID && o.GuestMemfd == g && o.GuestMemfdOffset < s.GuestMemfdOffset+s.Size &&
			s.GuestMemfdOffset < o.GuestMemfdOffset+o.Size {
			return fmt.Errorf("%w: guest_memfd [%#x, +%#x) overlaps slot %d's [%#x, +%#x) of it", ErrSlotOverlap,
				s.GuestMemfdOffset, s.Size, o.ID, o.GuestMemfdOffset, o.Size)
		}
	}
	return nil
}
