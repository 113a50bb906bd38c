package kvm

// White-box tests of what the kernel cannot be made to do on demand: exits
// of every kind decoded from a synthetic run page, signal retries, and the
// errors for a device this process may not open. They do not use
// internal/testenv (which imports this package).

import (
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestRetryHidesEINTR(t *testing.T) {
	calls := 0
	v, err := retry(func() (uintptr, error) {
		calls++
		if calls < 4 {
			return 0, syscall.EINTR
		}
		return 42, nil
	})
	if v != 42 || err != nil || calls != 4 {
		t.Fatalf("retry = %d, %v after %d calls; want 42, nil after 4", v, err, calls)
	}
	calls = 0
	err = retryErr(func() error {
		calls++
		if calls == 1 {
			return syscall.EINTR
		}
		return syscall.EINVAL
	})
	if !errors.Is(err, syscall.EINVAL) || calls != 2 {
		t.Fatalf("retryErr = %v after %d calls; want EINVAL after 2", err, calls)
	}
	// Only EINTR is retried: EAGAIN from an ioctl is an answer.
	calls = 0
	err = retryErr(func() error { calls++; return syscall.EAGAIN })
	if !errors.Is(err, syscall.EAGAIN) || calls != 1 {
		t.Fatalf("retryErr(EAGAIN) = %v after %d calls; want EAGAIN after 1", err, calls)
	}
}

// page is a synthetic kvm_run page.
type page struct{ runPage }

func newPage(reason ExitReason) page {
	p := page{make(runPage, 4096)}
	binary.LittleEndian.PutUint32(p.runPage[runExitReason:], uint32(reason))
	return p
}

func (p page) put8(off int, v uint8)   { p.runPage[off] = v }
func (p page) put16(off int, v uint16) { binary.LittleEndian.PutUint16(p.runPage[off:], v) }
func (p page) put32(off int, v uint32) { binary.LittleEndian.PutUint32(p.runPage[off:], v) }
func (p page) put64(off int, v uint64) { binary.LittleEndian.PutUint64(p.runPage[off:], v) }

func TestDecodeIOExit(t *testing.T) {
	p := newPage(ExitIO)
	p.put8(runUnion, 1) // KVM_EXIT_IO_OUT
	p.put8(runUnion+1, 4)
	p.put16(runUnion+2, 0x3f8)
	p.put32(runUnion+4, 1)
	p.put64(runUnion+8, 0x200)
	p.put32(0x200, 0xdeadbeef)
	e, err := decodeExit(p.runPage, nil)
	if err != nil || e.Reason != ExitIO || e.IO == nil {
		t.Fatalf("decodeExit = %+v, %v", e, err)
	}
	if !e.IO.Out || e.IO.Size != 4 || e.IO.Port != 0x3f8 || e.IO.Count != 1 || e.IO.Value() != 0xdeadbeef ||
		len(e.IO.Data) != 4 {
		t.Fatalf("IO exit %+v", *e.IO)
	}
	if got, want := e.String(), "io out port 0x3f8 size 4 value 0xdeadbeef"; got != want {
		t.Fatalf("String = %q, want %q", got, want)
	}

	// An IN: the VMM's answer goes into the run page, where KVM reads it.
	p.put8(runUnion, 0)
	p.put8(runUnion+1, 2)
	p.put32(runUnion+4, 3) // string I/O: 3 accesses
	e, _ = decodeExit(p.runPage, nil)
	if e.IO.Out || len(e.IO.Data) != 6 {
		t.Fatalf("IN exit %+v", *e.IO)
	}
	copy(e.IO.Data, []byte{1, 2, 3, 4, 5, 6})
	if p.runPage[0x200] != 1 || p.runPage[0x205] != 6 {
		t.Fatal("IN data does not alias the run page")
	}

	// A data offset outside the page (a kernel bug, or a stale page) gives
	// no data rather than a panic.
	p.put64(runUnion+8, 1<<40)
	if e, _ = decodeExit(p.runPage, nil); e.IO.Data != nil || e.IO.Value() != 0 {
		t.Fatalf("bad data offset: %+v", *e.IO)
	}
	p.put64(runUnion+8, 4092) // 6 bytes from 4092 run past 4096
	if e, _ = decodeExit(p.runPage, nil); e.IO.Data != nil {
		t.Fatalf("data past the page end: %+v", *e.IO)
	}
}

func TestDecodeMMIOExit(t *testing.T) {
	p := newPage(ExitMMIO)
	p.put64(runUnion, 0xd000_0010)
	p.put64(runUnion+8, 0x1122334455667788)
	p.put32(runUnion+16, 4)
	p.put8(runUnion+20, 1)
	e, err := decodeExit(p.runPage, nil)
	if err != nil || e.MMIO == nil {
		t.Fatalf("decodeExit = %+v, %v", e, err)
	}
	m := e.MMIO
	if m.Addr != 0xd000_0010 || !m.Write || m.Len != 4 || len(m.Data) != 4 || m.Value() != 0x55667788 {
		t.Fatalf("MMIO exit %+v", *m)
	}
	if got, want := e.String(), "mmio write 0xd0000010 len 4 value 0x55667788"; got != want {
		t.Fatalf("String = %q, want %q", got, want)
	}
	// A read: the answer goes into the run page.
	p.put8(runUnion+20, 0)
	p.put32(runUnion+16, 8)
	e, _ = decodeExit(p.runPage, nil)
	binary.LittleEndian.PutUint64(e.MMIO.Data, 0xabcdef)
	if e.MMIO.Write || binary.LittleEndian.Uint64(p.runPage[runUnion+8:]) != 0xabcdef {
		t.Fatal("MMIO read data does not alias the run page")
	}
	// kvm_run holds 8 data bytes; a bogus length is clipped to them.
	p.put32(runUnion+16, 1000)
	if e, _ = decodeExit(p.runPage, nil); len(e.MMIO.Data) != 8 {
		t.Fatalf("len 1000: %d data bytes", len(e.MMIO.Data))
	}
}

func TestDecodeMemoryFault(t *testing.T) {
	p := newPage(ExitMemoryFault)
	p.put64(runUnion, 1<<3) // KVM_MEMORY_EXIT_FLAG_PRIVATE
	p.put64(runUnion+8, 0x4000_0000)
	p.put64(runUnion+16, 0x1000)
	for _, errno := range []syscall.Errno{syscall.EFAULT, unix.EHWPOISON} {
		e, err := decodeExit(p.runPage, errno)
		var mf *MemoryFaultError
		if !errors.As(err, &mf) || !errors.Is(err, ErrMemoryFault) || !errors.Is(err, errno) {
			t.Fatalf("%v: err = %v, want a *MemoryFaultError wrapping ErrMemoryFault and the errno", errno, err)
		}
		if !mf.Known || mf.GPA != 0x4000_0000 || mf.Size != 0x1000 || !mf.Private || mf.MMIO {
			t.Fatalf("%v: %+v", errno, *mf)
		}
		if e.Reason != ExitMemoryFault || !strings.Contains(err.Error(), "0x40000000") {
			t.Fatalf("%v: exit %v, error %q", errno, e, err)
		}
	}
	// EFAULT without KVM_EXIT_MEMORY_FAULT: the address is unknown (Run
	// clears the exit reason before each KVM_RUN, so a stale one from an
	// earlier fault cannot be mistaken for this one).
	p = newPage(ExitUnknown)
	_, err := decodeExit(p.runPage, syscall.EFAULT)
	var mf *MemoryFaultError
	if !errors.As(err, &mf) || mf.Known || !strings.Contains(err.Error(), "not reported") {
		t.Fatalf("err = %v", err)
	}
	// Any other errno is the ioctl's error, named.
	_, err = decodeExit(p.runPage, syscall.EINVAL)
	var se *os.SyscallError
	if !errors.As(err, &se) || se.Syscall != "KVM_RUN" || errors.Is(err, ErrMemoryFault) {
		t.Fatalf("EINVAL: err = %v", err)
	}
}

func TestMemoryFaultFromMMIO(t *testing.T) {
	mf := &MemoryFaultError{GPA: 0x1000, Size: 8, Known: true, MMIO: true, Write: true, Slot: 3}
	if !errors.Is(mf, ErrMemoryFault) || errors.Is(mf, syscall.EFAULT) {
		t.Fatal("an MMIO-reported fault wraps ErrMemoryFault and no errno")
	}
	for _, want := range []string{"write of 8 bytes", "0x1000", "slot 3", "MMIO"} {
		if !strings.Contains(mf.Error(), want) {
			t.Errorf("%q lacks %q", mf.Error(), want)
		}
	}
}

func TestDecodeOtherExits(t *testing.T) {
	p := newPage(ExitInternalError)
	p.put32(runUnion, 1)
	if e, err := decodeExit(p.runPage, nil); err != nil || e.Suberror != 1 || e.String() != "internal-error suberror 1" {
		t.Fatalf("internal error: %v, %v", e, err)
	}
	p = newPage(ExitFailEntry)
	p.put64(runUnion, 0x80000021)
	if e, err := decodeExit(p.runPage, nil); err != nil || e.HardwareReason != 0x80000021 ||
		e.String() != "fail-entry reason 0x80000021" {
		t.Fatalf("fail entry: %v, %v", e, err)
	}
	for r, want := range map[ExitReason]string{ExitHLT: "hlt", ExitShutdown: "shutdown", ExitIntr: "intr",
		ExitException: "exception", ExitUnknown: "unknown", ExitReason(77): "exit(77)"} {
		if e, _ := decodeExit(newPage(r).runPage, nil); e.String() != want {
			t.Errorf("exit %d: %q, want %q", r, e.String(), want)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	err := openError("/dev/kvm", &fs.PathError{Op: "open", Path: "/dev/kvm", Err: syscall.EACCES})
	// The advice follows the node as it is (TestAccessAdvice has the cases).
	if !errors.Is(err, ErrPermission) || !strings.Contains(err.Error(), "/dev/kvm") {
		t.Fatalf("EACCES: %v", err)
	}
	for _, errno := range []syscall.Errno{syscall.ENOENT, syscall.ENODEV, syscall.ENXIO, syscall.EISDIR} {
		err := openError("/x/kvm", &fs.PathError{Op: "open", Path: "/x/kvm", Err: errno})
		if !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), "/x/kvm") {
			t.Errorf("%v: %v", errno, err)
		}
	}
	err = openError("/x/kvm", &fs.PathError{Op: "open", Path: "/x/kvm", Err: syscall.EMFILE})
	if !errors.Is(err, syscall.EMFILE) || errors.Is(err, ErrNoDevice) {
		t.Fatalf("EMFILE: %v", err)
	}
}

func TestStrings(t *testing.T) {
	for f, want := range map[SlotFlags]string{0: "none", LogDirtyPages: "log-dirty", ReadOnly: "read-only",
		LogDirtyPages | ReadOnly: "log-dirty|read-only"} {
		if f.String() != want {
			t.Errorf("SlotFlags(%d) = %q, want %q", f, f.String(), want)
		}
	}
	if CapUserMemory2.String() != "KVM_CAP_USER_MEMORY2" || Cap(9999).String() != "KVM_CAP(9999)" {
		t.Errorf("Cap strings: %v %v", CapUserMemory2, Cap(9999))
	}
	e := &SlotError{Op: "SetSlot", Slot: 7, Err: ErrSlotOverlap}
	if !errors.Is(e, ErrSlotOverlap) || e.Error() != "kvm: SetSlot slot 7: kvm: memory slot overlaps another" {
		t.Errorf("SlotError: %v", e)
	}
	if err := ioctlErr("X", nil); err != nil {
		t.Errorf("ioctlErr(nil) = %v", err)
	}
}

// TestKernelAgreesOnSlotLimit checks the table's limit against the kernel
// itself: slot MaxSlots()-1 is accepted, slot MaxSlots() is refused
// (EINVAL). The VM's table would refuse the second before the kernel sees
// it; this goes around it.
func TestKernelAgreesOnSlotLimit(t *testing.T) {
	vm := internalVM(t)
	mem, err := unix.Mmap(-1, 0, pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	host := hostAddr(mem)
	last := uint32(vm.MaxSlots() - 1)
	if err := vm.setRegion(last, 0, 0, pageSize, host); err != nil {
		t.Fatalf("slot %d: %v", last, err)
	}
	if err := vm.setRegion(last+1, 0, pageSize, pageSize, host); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("slot %d: err = %v, want EINVAL from the kernel", last+1, err)
	}
	if err := vm.setRegion(last, 0, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	// The kernel's size limit is MaxSlotPages: one page more is EINVAL
	// before the kernel allocates anything (the host range, unmapped, is
	// user space, so this is not the address check refusing it).
	const hostLow = 1 << 40
	if err := vm.setRegion(0, 0, 0, (MaxSlotPages+1)*pageSize, hostLow); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("slot of MaxSlotPages+1 pages: err = %v, want EINVAL from the kernel", err)
	}
}

// internalVM is testenv.VM for this package's own tests (testenv imports
// kvm): a VM closed at cleanup, or a skip without KVM that fails under
// GMEM_REQUIRE_KVM=1.
func internalVM(t *testing.T) *VM {
	t.Helper()
	d, err := Open("")
	if err != nil {
		if os.Getenv("GMEM_REQUIRE_KVM") == "1" {
			t.Fatalf("GMEM_REQUIRE_KVM=1 but: %v", err)
		}
		t.Skip(err)
	}
	t.Cleanup(func() { d.Close() })
	vm, err := d.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}
