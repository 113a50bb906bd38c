package kvm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

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
	// ExitDirtyRingFull (KVM_EXIT_DIRTY_RING_FULL): the vCPU's dirty ring
	// is full. Run handles it (it harvests the rings and enters the guest
	// again), so a caller sees it only on a VM adopted with a ring this
	// package does not know, or with Run's error when handling it failed.
	ExitDirtyRingFull ExitReason = 31
	ExitMemoryFault   ExitReason = 39
)

// String returns the exit reason's name, in lower case, or exit(n).
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
	case ExitDirtyRingFull:
		return "dirty-ring-full"
	case ExitMemoryFault:
		return "memory-fault"
	}
	return fmt.Sprintf("exit(%d)", uint32(r))
}

// IOExit is a port I/O exit. For an OUT, Data holds what the guest wrote;
// for an IN, write the value into Data before the next Run.
type IOExit struct {
	Out   bool   // a port write (OUT); false for a read (IN)
	Port  uint16 // the I/O port
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
	Addr  uint64 // guest-physical address of the access
	Write bool   // a write; false for a read
	Len   uint32 // bytes accessed: 1, 2, 4 or 8
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
	Reason ExitReason // kvm_run.exit_reason
	IO     *IOExit    // for ExitIO
	MMIO   *MMIOExit  // for ExitMMIO
	// Suberror is the internal error's kind (1: emulation failure) for
	// ExitInternalError.
	Suberror uint32
	// HardwareReason is the VM-entry failure reason for ExitFailEntry.
	HardwareReason uint64
}

// String describes the exit in one line, with its port or address and
// value.
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

// VCPU is a virtual CPU of a VM. Its methods may be called from any
// goroutine, and are serialized: Regs, SetRegs or Close called while Run is
// in progress wait for it to return. The exit data Run returns (IOExit.Data,
// MMIOExit.Data) points into the vCPU's run page and belongs to the caller of
// Run until the next Run.
type VCPU struct {
	mu  sync.Mutex
	f   *os.File
	run runPage
	id  int
	vm  *VM

	interrupted atomic.Uint64 // KVM_RUN calls a signal interrupted (retried)
	ringFull    atomic.Uint64 // KVM_EXIT_DIRTY_RING_FULL exits Run handled

	// ring is the vCPU's dirty ring, when the VM has them; set at creation
	// and cleared by Close, both with mu held.
	ring *dirtyRing

	// Control (control.go). kmu keeps the run page mapped for Kick, which
	// runs without mu; tid is the OS thread inside KVM_RUN (0: none).
	kmu      sync.RWMutex
	tid      atomic.Int32
	kick     atomic.Uint32 // pending kick bits
	state    atomic.Int32  // a VCPUState
	closing  atomic.Bool
	closed   chan struct{} // closed by Close, wakes a Run parked by Pause
	closeOne sync.Once
}

// CreateVCPU creates vCPU id and maps its run page.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return nil, fmt.Errorf("kvm: creating vCPU %d: %w", id, errVMClosed)
	}
	fd, err := retry(func() (uintptr, error) { return gokvm.CreateVCPU(vm.f.Fd(), id) })
	if err != nil {
		return nil, fmt.Errorf("kvm: creating vCPU %d: %w", id, ioctlErr("KVM_CREATE_VCPU", err))
	}
	syscall.CloseOnExec(int(fd))
	return vm.wrapVCPU(os.NewFile(fd, fmt.Sprintf("kvm-vcpu:%d", id)), id)
}

// wrapVCPU maps f's run page and adds the vCPU to the VM; on error it
// closes f. The caller holds vm.mu.
func (vm *VM) wrapVCPU(f *os.File, id int) (*VCPU, error) {
	c := &VCPU{f: f, id: id, vm: vm, closed: make(chan struct{})}
	vm.vcpusMade++ // the kernel has it, whatever happens next
	size, err := retry(func() (uintptr, error) { return vcpuMmapSize(vm.kvmFD.Fd()) })
	if err != nil {
		c.f.Close()
		return nil, fmt.Errorf("kvm: vCPU %d: %w", id, ioctlErr("KVM_GET_VCPU_MMAP_SIZE", err))
	}
	c.run, err = mapRunPage(f.Fd(), int(size))
	if err != nil {
		c.f.Close()
		return nil, fmt.Errorf("kvm: mapping vCPU %d run page: %w", id, os.NewSyscallError("mmap", err))
	}
	if err := vm.mapDirtyRing(c); err != nil {
		unix.Munmap(c.run)
		c.f.Close()
		return nil, err
	}
	vm.vcpus = append(vm.vcpus, c)
	return c, nil
}

// ID returns the vCPU's id.
func (c *VCPU) ID() int { return c.id }

// Close unmaps the run page and closes the vCPU, after waiting for a Run in
// progress to return. Closing twice returns nil. VM.Close closes its vCPUs
// too. On a VM with dirty rings, the vCPU's ring is harvested first, so
// the pages it logged are still reported by GetDirtyLog.
//
// Close never waits on a guest: it kicks the vCPU first (see Kick), so a
// Run in the guest returns promptly, and a Run parked by VM.Pause wakes;
// both return ErrClosed.
func (c *VCPU) Close() error {
	c.closing.Store(true)
	c.closeOne.Do(func() { close(c.closed) })
	c.kickWith(kickClose)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f == nil {
		return nil
	}
	rerr := c.vm.unmapDirtyRing(c)
	c.kmu.Lock()
	err := errors.Join(rerr, unix.Munmap(c.run), c.f.Close())
	c.f, c.run = nil, nil
	c.kmu.Unlock()
	c.state.Store(int32(StateClosed))
	return err
}

func (c *VCPU) fd() (uintptr, error) {
	if c.f == nil {
		return 0, fmt.Errorf("kvm: vCPU %d: %w", c.id, errVCPUClosed)
	}
	return c.f.Fd(), nil
}

// kvm_run offsets (include/uapi/linux/kvm.h).
const (
	runImmediateExit = 1
	runExitReason    = 8
	runUnion         = 32
)

// Complete finishes the I/O or MMIO access the guest is still waiting on
// after an exit, without running any further guest instruction: KVM_RUN
// with immediate_exit set (KVM_CAP_IMMEDIATE_EXIT, Linux 4.11). KVM only
// applies the result of an IN or MMIO read (the value in the exit's Data) on
// the next KVM_RUN, and that write-back also sets RIP and the destination
// register. So a VMM that abandons an exit instead of resuming the guest (to
// run other code with SetRegs, or to save the vCPU's state) must call
// Complete first, or the next Run will overwrite the registers it set. With
// no exit pending Complete does nothing.
func (c *VCPU) Complete() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return err
	}
	c.run[runImmediateExit] = 1
	defer func() { c.run[runImmediateExit] = 0 }()
	for {
		c.run.putU32(runExitReason, uint32(ExitUnknown))
		err = runIoctl(fd)
		if !errors.Is(err, syscall.EAGAIN) {
			break
		}
	}
	if err == nil || errors.Is(err, syscall.EINTR) {
		return nil
	}
	_, err = decodeExit(c.run, err)
	return fmt.Errorf("kvm: completing the pending exit of vCPU %d: %w", c.id, err)
}

// Run runs the vCPU until it exits to the VMM and describes the exit.
//
// A signal that interrupts KVM_RUN (EINTR, with KVM_EXIT_INTR) is not an
// exit: Run enters the guest again. The exception is Kick (and a context
// given to RunContext that ends): Run then returns an ExitIntr exit with the
// registers where the guest stopped; run again to continue. While the VM is
// paused (VM.Pause), Run waits for VM.Resume and then enters the guest.
//
// A guest access to slot memory whose host mapping cannot be faulted in
// (unmapped, PROT_NONE, a write to a read-only mapping, a truncated file) is
// an error wrapping ErrMemoryFault, a *MemoryFaultError. KVM reports it in
// one of two ways, and Run turns both into that error:
//   - KVM_RUN fails with EFAULT or EHWPOISON, with the guest address in a
//     KVM_EXIT_MEMORY_FAULT exit on kernels that fill one in
//     (KVM_CAP_MEMORY_FAULT_INFO); MemoryFaultError.Known says whether the
//     address is known.
//   - The instruction emulator (which runs every guest instruction on hosts
//     without hardware virtualization, and some instructions everywhere)
//     cannot read or write the host memory and reports an MMIO exit for an
//     address a slot covers. Run checks every MMIO exit against the slot
//     table; one inside a slot is a memory fault (MemoryFaultError.MMIO is
//     set, and the returned Exit still holds the MMIO exit), except a write
//     to a ReadOnly slot, which is an ordinary MMIO exit by design.
//
// A slot inserted while the vCPU was in the guest (hot-added, moved, or
// recreated with other flags) does not count: KVM may have decided on the
// MMIO exit before the slot existed, so such an exit is returned as an
// ordinary MMIO exit, and the next access reaches the memory. A slot
// deleted while the access was in flight gives an ordinary MMIO exit too.
//
// On a VM with dirty rings (VM.EnableDirtyRing), a vCPU whose ring is full
// leaves the guest with KVM_EXIT_DIRTY_RING_FULL. That is not an exit for
// the caller either: Run harvests every vCPU's ring into the VM's
// harvested pages (as VM.HarvestDirtyRings does), resets them, and enters
// the guest again; DirtyRingFullExits counts these. If the harvest fails,
// Run returns the ExitDirtyRingFull exit with the error, and running again
// retries.
func (c *VCPU) Run() (Exit, error) { return c.RunContext(context.Background()) }

// runOnce enters the guest once (as many KVM_RUN calls as signals that are
// not kicks take). again says a pause kick stopped it: park, then run again.
func (c *VCPU) runOnce() (e Exit, err error, again bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return Exit{}, err, false
	}
	if c.closing.Load() {
		return Exit{}, fmt.Errorf("kvm: vCPU %d: %w", c.id, errVCPUClosed), false
	}
	// A kick signals the thread inside KVM_RUN: keep to one thread, and
	// say which.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c.tid.Store(int32(unix.Gettid()))
	defer c.tid.Store(0)
	// An MMIO exit for an address a slot covers is a memory fault only if
	// the slot was there when the vCPU entered the guest: one added while
	// it ran (hotplug) may be reached by an exit KVM decided on before.
	gen := c.vm.generation()
	var ringSeen uint64
	if c.ring != nil {
		ringSeen = c.vm.ringTotal(c)
	}
	for {
		e, err, again, done := c.enterOnce(fd)
		if done {
			return e, err, again
		}
		if err == nil && e.Reason == ExitDirtyRingFull && c.ring != nil {
			// Harvest and go on: the caller sees no exit. If nothing was
			// taken from this vCPU's ring since the last look, the kernel
			// reports a full ring whose entries this package cannot see;
			// entering again would loop.
			c.ringFull.Add(1)
			total, progress, herr := c.vm.ringFull(c, ringSeen)
			if herr != nil {
				return e, fmt.Errorf("kvm: vCPU %d: harvesting its full dirty ring: %w", c.id, herr), false
			}
			if !progress {
				return e, fmt.Errorf("kvm: vCPU %d: KVM reports its dirty ring full, but the ring holds no entry to "+
					"harvest", c.id), false
			}
			ringSeen = total
			continue
		}
		if err == nil && e.MMIO != nil {
			if s, inSlot := c.vm.slotAtSince(e.MMIO.Addr, gen); inSlot && !(e.MMIO.Write && s.Flags&ReadOnly != 0) {
				err = &MemoryFaultError{GPA: e.MMIO.Addr, Size: uint64(e.MMIO.Len), Known: true, Write: e.MMIO.Write,
					MMIO: true, Slot: s.ID}
			}
		}
		return e, err, false
	}
}

// enterOnce calls KVM_RUN until it returns for a reason other than a signal
// that is not a kick, and decodes the exit. done says a kick ended it
// (again, as for runOnce, says it was a pause). The caller holds c.mu.
func (c *VCPU) enterOnce(fd uintptr) (e Exit, err error, again, done bool) {
	for {
		// Clear, then set again if a kick is pending: a kick whose bits
		// land after the load writes immediate_exit after the clear (or,
		// once in KVM_RUN, signals this thread), so none is lost, and a
		// stale immediate_exit with no kick pending cannot spin here.
		c.run[runImmediateExit] = 0
		if c.kick.Load() != 0 {
			c.run[runImmediateExit] = 1
		}
		// The exit reason is only meaningful after some errors (the
		// kernel leaves it stale after others), so clear it first.
		c.run.putU32(runExitReason, uint32(ExitUnknown))
		err = runIoctl(fd)
		if !errors.Is(err, syscall.EINTR) && !errors.Is(err, syscall.EAGAIN) {
			break
		}
		if k := c.kick.Swap(0); k != 0 {
			c.run[runImmediateExit] = 0
			switch {
			case k&kickClose != 0:
				return Exit{Reason: ExitIntr}, fmt.Errorf("kvm: vCPU %d: %w", c.id, errVCPUClosed), false, true
			case k&kickUser != 0:
				return Exit{Reason: ExitIntr}, nil, false, true
			}
			return Exit{Reason: ExitIntr}, nil, true, true
		}
		c.interrupted.Add(1)
	}
	e, err = decodeExit(c.run, err)
	return e, err, false, false
}

// DirtyRingFullExits returns how many times this vCPU left the guest
// because its dirty ring was full (KVM_EXIT_DIRTY_RING_FULL) and Run
// harvested the rings and went on. A VMM that sees it grow often can
// harvest more often (VM.HarvestDirtyRings) or use a larger ring.
func (c *VCPU) DirtyRingFullExits() uint64 { return c.ringFull.Load() }

// decodeExit describes the exit in the run page p after KVM_RUN returned err.
func decodeExit(p runPage, err error) (Exit, error) {
	reason := ExitReason(p.u32(runExitReason))
	if err != nil {
		if errors.Is(err, syscall.EFAULT) || errors.Is(err, unix.EHWPOISON) {
			mf := &MemoryFaultError{Err: ioctlErr("KVM_RUN", err)}
			if reason == ExitMemoryFault {
				const flagPrivate = 1 << 3 // KVM_MEMORY_EXIT_FLAG_PRIVATE
				mf.Known, mf.GPA, mf.Size = true, p.u64(runUnion+8), p.u64(runUnion+16)
				mf.Private = p.u64(runUnion)&flagPrivate != 0
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

func (p runPage) putU32(off int, v uint32) { binary.LittleEndian.PutUint32(p[off:], v) }
