package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// Regs are a vCPU's general-purpose registers (struct kvm_regs).
type Regs = gokvm.Regs

// Sregs are a vCPU's special registers (struct kvm_sregs).
type Sregs = gokvm.Sregs

// Segment is a segment register as KVM holds it.
type Segment = gokvm.Segment

// Descriptor is a descriptor-table register (GDTR, IDTR).
type Descriptor = gokvm.Descriptor

// ExitReason is why KVM_RUN returned (KVM_EXIT_*).
type ExitReason uint32

// The exit reasons a memory-focused VMM meets.
const (
	ExitUnknown       ExitReason = 0
	ExitException     ExitReason = 1
	ExitIO            ExitReason = 2
	ExitHLT           ExitReason = 5
	ExitMMIO          ExitReason = 6
	ExitShutdown      ExitReason = 8
	ExitFailEntry     ExitReason = 9
	ExitIntr          ExitReason = 10
	ExitInternalError ExitReason = 17
	ExitMemoryFault   ExitReason = 39
)

func (r ExitReason) String() string {
	switch r {
	case ExitUnknown:
		return "unknown"
	case ExitException:
		return "exception"
	case ExitIO:
		return "io"
	case ExitHLT:
		return "hlt"
	case ExitMMIO:
		return "mmio"
	case ExitShutdown:
		return "shutdown"
	case ExitFailEntry:
		return "fail-entry"
	case ExitIntr:
		return "intr"
	case ExitInternalError:
		return "internal-error"
	case ExitMemoryFault:
		return "memory-fault"
	}
	return fmt.Sprintf("exit(%d)", uint32(r))
}

// IOExit is a port I/O exit. For an OUT, Data holds what the guest wrote;
// for an IN, write the value into Data before the next Run.
type IOExit struct {
	Out   bool
	Port  uint16
	Size  uint8  // bytes per access: 1, 2 or 4
	Count uint32 // accesses (string I/O)
	Data  []byte // Size*Count bytes inside the run page; valid until the next Run
}

// Value returns the first access's data as a little-endian number.
func (io *IOExit) Value() uint32 {
	var v uint32
	for i := 0; i < int(io.Size) && i < len(io.Data); i++ {
		v |= uint32(io.Data[i]) << (8 * i)
	}
	return v
}

// MMIOExit is a guest access to a guest-physical address no slot backs (or
// a write to a read-only slot). For a read, write the value into Data
// before the next Run.
type MMIOExit struct {
	Addr  uint64
	Write bool
	Len   uint32
	Data  []byte // Len bytes inside the run page; valid until the next Run
}

// Value returns Data as a little-endian number.
func (m *MMIOExit) Value() uint64 {
	var v uint64
	for i := 0; i < int(m.Len) && i < len(m.Data); i++ {
		v |= uint64(m.Data[i]) << (8 * i)
	}
	return v
}

// Exit describes why Run returned.
type Exit struct {
	Reason ExitReason
	IO     *IOExit   // for ExitIO
	MMIO   *MMIOExit // for ExitMMIO
	// Suberror is the internal error's kind (1: emulation failure) for
	// ExitInternalError; HardwareReason the failure reason for ExitFailEntry.
	Suberror       uint32
	HardwareReason uint64
}

func (e Exit) String() string {
	switch {
	case e.IO != nil:
		dir := "in"
		if e.IO.Out {
			dir = "out"
		}
		return fmt.Sprintf("io %s port %#x size %d value %#x", dir, e.IO.Port, e.IO.Size, e.IO.Value())
	case e.MMIO != nil:
		dir := "read"
		if e.MMIO.Write {
			dir = "write"
		}
		return fmt.Sprintf("mmio %s %#x len %d value %#x", dir, e.MMIO.Addr, e.MMIO.Len, e.MMIO.Value())
	case e.Reason == ExitInternalError:
		return fmt.Sprintf("internal-error suberror %d", e.Suberror)
	case e.Reason == ExitFailEntry:
		return fmt.Sprintf("fail-entry reason %#x", e.HardwareReason)
	}
	return e.Reason.String()
}

// VCPU is a virtual CPU of a VM. Run, registers and the exit data belong to
// one goroutine at a time; Close may be called from another.
type VCPU struct {
	mu  sync.Mutex
	f   *os.File
	run runPage
	id  int
	vm  *VM
}

// CreateVCPU creates vCPU id and maps its run page.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return nil, ErrClosed
	}
	fd, err := retry(func() (uintptr, error) { return gokvm.CreateVCPU(vm.f.Fd(), id) })
	if err != nil {
		return nil, fmt.Errorf("kvm: creating vCPU %d: %w", id, ioctlErr("KVM_CREATE_VCPU", err))
	}
	syscall.CloseOnExec(int(fd))
	c := &VCPU{f: os.NewFile(fd, fmt.Sprintf("kvm-vcpu:%d", id)), id: id, vm: vm}
	size, err := retry(func() (uintptr, error) { return vcpuMmapSize(vm.kvmFD.Fd()) })
	if err != nil {
		c.f.Close()
		return nil, fmt.Errorf("kvm: vCPU %d: %w", id, ioctlErr("KVM_GET_VCPU_MMAP_SIZE", err))
	}
	c.run, err = mapRunPage(fd, int(size))
	if err != nil {
		c.f.Close()
		return nil, fmt.Errorf("kvm: mapping vCPU %d run page: %w", id, os.NewSyscallError("mmap", err))
	}
	vm.vcpus = append(vm.vcpus, c)
	return c, nil
}

// ID returns the vCPU's id.
func (c *VCPU) ID() int { return c.id }

// Close unmaps the run page and closes the vCPU. Closing twice returns nil.
// VM.Close closes its vCPUs too.
func (c *VCPU) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f == nil {
		return nil
	}
	err := errors.Join(unix.Munmap(c.run), c.f.Close())
	c.f, c.run = nil, nil
	return err
}

func (c *VCPU) fd() (uintptr, error) {
	if c.f == nil {
		return 0, ErrClosed
	}
	return c.f.Fd(), nil
}

// SetHostCPUID gives the vCPU every CPUID leaf KVM supports on this host
// (KVM_GET_SUPPORTED_CPUID, then KVM_SET_CPUID2). KVM refuses long mode to a
// vCPU whose CPUID does not list it, so set this before SetSregs.
func (c *VCPU) SetHostCPUID() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return err
	}
	cpuid := gokvm.CPUID{Nent: 256, Entries: make([]gokvm.CPUIDEntry2, 256)}
	if err := retryErr(func() error { return gokvm.GetSupportedCPUID(c.vm.kvmFD.Fd(), &cpuid) }); err != nil {
		return ioctlErr("KVM_GET_SUPPORTED_CPUID", err)
	}
	cpuid.Entries = cpuid.Entries[:cpuid.Nent]
	return ioctlErr("KVM_SET_CPUID2", retryErr(func() error { return gokvm.SetCPUID2(fd, &cpuid) }))
}

// Regs returns the general-purpose registers.
func (c *VCPU) Regs() (Regs, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return Regs{}, err
	}
	var r *Regs
	err = retryErr(func() error { var err error; r, err = getRegs(fd); return err })
	if err != nil {
		return Regs{}, ioctlErr("KVM_GET_REGS", err)
	}
	return *r, nil
}

// SetRegs sets the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return err
	}
	return ioctlErr("KVM_SET_REGS", retryErr(func() error { return setRegs(fd, &r) }))
}

// Sregs returns the special registers.
func (c *VCPU) Sregs() (Sregs, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return Sregs{}, err
	}
	var r *Sregs
	err = retryErr(func() error { var err error; r, err = getSregs(fd); return err })
	if err != nil {
		return Sregs{}, ioctlErr("KVM_GET_SREGS", err)
	}
	return *r, nil
}

// SetSregs sets the special registers.
func (c *VCPU) SetSregs(r Sregs) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return err
	}
	return ioctlErr("KVM_SET_SREGS", retryErr(func() error { return setSregs(fd, &r) }))
}

// kvm_run offsets (include/uapi/linux/kvm.h).
const (
	runExitReason = 8
	runUnion      = 32
)

// Run runs the vCPU until it exits to the VMM, retrying when a signal
// interrupts KVM_RUN, and describes the exit. A guest access to a slot whose
// host memory cannot be faulted in is a *MemoryFaultError (ErrMemoryFault).
func (c *VCPU) Run() (Exit, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return Exit{}, err
	}
	for {
		err = runIoctl(fd)
		if !errors.Is(err, syscall.EINTR) && !errors.Is(err, syscall.EAGAIN) {
			break
		}
	}
	p := c.run
	reason := ExitReason(p.u32(runExitReason))
	if err != nil {
		if errors.Is(err, syscall.EFAULT) || errors.Is(err, unix.EHWPOISON) {
			mf := &MemoryFaultError{Err: err}
			if reason == ExitMemoryFault {
				mf.Known, mf.GPA, mf.Size = true, p.u64(runUnion+8), p.u64(runUnion+16)
			}
			return Exit{Reason: reason}, mf
		}
		return Exit{Reason: reason}, ioctlErr("KVM_RUN", err)
	}
	e := Exit{Reason: reason}
	switch reason {
	case ExitIO:
		io := &IOExit{Out: p.u8(runUnion) == 1, Size: p.u8(runUnion + 1), Port: p.u16(runUnion + 2),
			Count: p.u32(runUnion + 4)}
		off, n := p.u64(runUnion+8), uint64(io.Size)*uint64(io.Count)
		if off <= uint64(len(p)) && n <= uint64(len(p))-off {
			io.Data = p[off : off+n]
		}
		e.IO = io
	case ExitMMIO:
		m := &MMIOExit{Addr: p.u64(runUnion), Len: p.u32(runUnion + 16), Write: p.u8(runUnion+20) != 0}
		m.Data = p[runUnion+8 : runUnion+8+int(min(m.Len, 8))]
		e.MMIO = m
	case ExitInternalError:
		e.Suberror = p.u32(runUnion)
	case ExitFailEntry:
		e.HardwareReason = p.u64(runUnion)
	}
	return e, nil
}

// runPage is the vCPU's mmap'd struct kvm_run. It is read as bytes with
// encoding/binary at the offsets of the kernel's layout, so no pointer into
// it ever escapes.
type runPage []byte

func mapRunPage(fd uintptr, size int) (runPage, error) {
	b, err := unix.Mmap(int(fd), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	return runPage(b), err
}

func (p runPage) u8(off int) uint8   { return p[off] }
func (p runPage) u16(off int) uint16 { return binary.LittleEndian.Uint16(p[off:]) }
func (p runPage) u32(off int) uint32 { return binary.LittleEndian.Uint32(p[off:]) }
func (p runPage) u64(off int) uint64 { return binary.LittleEndian.Uint64(p[off:]) }
