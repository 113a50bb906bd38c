//go:build amd64

package boot_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// The Debian kernel's command line on a VM with a serial port and nothing
// else, from /work/shared/notes/linux-boot-on-this-host.md: earlyprintk so
// the memory map is printed before any console driver; noxsave and the
// clearcpuid list because KVM's emulator (on hosts without hardware
// virtualization) lacks those instructions; the initcall blacklist skips
// minutes of tracing setup.
const debianCmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 nokaslr noxsave mitigations=off " +
	"cryptomgr.notests tsc=reliable nosoftlockup " +
	"clearcpuid=erms,fsrm,ssse3,sse4_1,sse4_2,pclmulqdq,aes,smap,popcnt " +
	"initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,event_trace_init,tracer_init_tracefs"

// TestDebianKernelBootsThroughPVH boots Debian's vmlinux through PVH on a
// VM with RAM below and above 4 GiB, the in-kernel irqchip and PIT and a
// serial port at 0x3f8, and reads the memory map the kernel prints
// ("BIOS-e820: [mem a-b] type") from its serial output: it must be exactly
// the layout's. It stops there, seconds into the boot (about 15 s where KVM
// emulates every instruction), and fails after a minute.
//
// The VM is made with gokvm's raw ioctls (the kvm package does not expose
// the VM and vCPU descriptors that KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2
// need): the harness below is test code, a VMM only as far as this boot
// needs.
func TestDebianKernelBootsThroughPVH(t *testing.T) {
	vmlinux := debianVmlinux(t)
	testenv.KVM(t) // skips (or fails under GMEM_REQUIRE_KVM=1) without /dev/kvm
	layout := guestmem.Layout{{GPA: 0, Size: 128 * kMiB}, {GPA: 4 * kGiB, Size: 64 * kMiB}}
	mem := newMem(t, layout)
	e, err := boot.LoadPVH(mem, bytes.NewReader(vmlinux), boot.Options{Cmdline: debianCmdline})
	require.NoError(t, err)

	v := newRawVM(t, mem)
	v.boot(e)
	start := time.Now()
	out, err := v.run(time.Minute, e820Printed)
	t.Logf("serial output after %v:\n%s", time.Since(start).Round(time.Millisecond), out)
	require.NoError(t, err)

	want, err := boot.MemoryMap(layout)
	require.NoError(t, err)
	require.Equal(t, want, e.E820)
	require.Equal(t, want, parseE820(t, out), "the memory map the kernel printed")
	t.Logf("the kernel printed the layout's memory map after %v", time.Since(start).Round(time.Millisecond))
}

var e820Line = regexp.MustCompile(`BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\S+)`)

// e820Printed reports whether out holds the whole "BIOS-provided physical
// RAM map": its heading, its entries, and a line after them.
func e820Printed(out []byte) bool {
	s := string(out)
	i := strings.Index(s, "BIOS-provided physical RAM map")
	if i < 0 {
		return false
	}
	lines := strings.Split(s[i:], "\n")
	if len(lines) < 2 {
		return false // the heading itself is not complete yet
	}
	for _, l := range lines[1 : len(lines)-1] { // the last may be incomplete
		if !e820Line.MatchString(l) {
			return true
		}
	}
	return false
}

// parseE820 returns the map printed in out.
func parseE820(t *testing.T, out []byte) []boot.E820Entry {
	t.Helper()
	var m []boot.E820Entry
	for _, g := range e820Line.FindAllStringSubmatch(string(out), -1) {
		lo, err1 := strconv.ParseUint(g[1], 16, 64)
		hi, err2 := strconv.ParseUint(g[2], 16, 64)
		require.NoError(t, errors.Join(err1, err2))
		typ := map[string]boot.E820Type{"usable": boot.E820RAM, "reserved": boot.E820Reserved}[g[3]]
		require.NotZero(t, typ, "type %q", g[3])
		m = append(m, boot.E820Entry{GPA: guestmem.GuestAddress(lo), Size: hi + 1 - lo, Type: typ})
	}
	return m
}

// rawVM is one vCPU on a VM made with raw ioctls, with guest memory from
// guestmem in its slots, the in-kernel irqchip and PIT, and the 16550
// registers earlyprintk uses.
type rawVM struct {
	t       *testing.T
	mem     *guestmem.Memory
	dev, vm *os.File
	cpu     *os.File
	page    []byte // the vCPU's struct kvm_run
	serial  bytes.Buffer
	dlab    bool // LCR bit 7: 0x3f8 is the divisor latch, not the transmitter
	fixes   map[string]int
}

// Addresses KVM needs on Intel hosts for its real-mode TSS and identity
// map: three pages and one, in the PCI hole (Firecracker's KVM_TSS_ADDRESS).
const (
	kvmTSSAddr      = 0xfffbd000
	kvmIdentityAddr = 0xfffbc000
)

func newRawVM(t *testing.T, mem *guestmem.Memory) *rawVM {
	t.Helper()
	v := &rawVM{t: t, mem: mem, fixes: map[string]int{}}
	var err error
	v.dev, err = os.OpenFile("/dev/kvm", os.O_RDWR|syscall.O_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { v.dev.Close() })
	vmfd, err := gokvm.CreateVM(v.dev.Fd())
	require.NoError(t, err)
	v.vm = os.NewFile(vmfd, "kvm-vm")
	t.Cleanup(func() { v.vm.Close() })
	require.NoError(t, gokvm.SetTSSAddr(vmfd, kvmTSSAddr))
	require.NoError(t, gokvm.SetIdentityMapAddr(vmfd, kvmIdentityAddr))
	require.NoError(t, gokvm.CreateIRQChip(vmfd))
	require.NoError(t, gokvm.CreatePIT2(vmfd))
	for i, r := range mem.Regions() {
		slot := &gokvm.UserspaceMemoryRegion{Slot: uint32(i), GuestPhysAddr: uint64(r.GPA), MemorySize: r.Size, UserspaceAddr: uint64(r.HostAddr)}
		require.NoError(t, gokvm.SetUserMemoryRegion(vmfd, slot))
		t.Cleanup(func() { // before the memory is unmapped
			slot.MemorySize = 0
			require.NoError(t, gokvm.SetUserMemoryRegion(vmfd, slot))
		})
	}
	cpufd, err := gokvm.CreateVCPU(vmfd, 0)
	require.NoError(t, err)
	v.cpu = os.NewFile(cpufd, "kvm-vcpu")
	t.Cleanup(func() { v.cpu.Close() })
	size, err := gokvm.GetVCPUMMmapSize(v.dev.Fd())
	require.NoError(t, err)
	v.page, err = unix.Mmap(int(cpufd), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Munmap(v.page) })
	cpuid := &gokvm.CPUID{Nent: 256, Entries: make([]gokvm.CPUIDEntry2, 256)}
	require.NoError(t, gokvm.GetSupportedCPUID(v.dev.Fd(), cpuid))
	require.NoError(t, gokvm.SetCPUID2(cpufd, cpuid))
	return v
}

// boot sets the vCPU's registers from e.
func (v *rawVM) boot(e *boot.Entry) {
	fd := v.cpu.Fd()
	gs, err := gokvm.GetSregs(fd)
	require.NoError(v.t, err)
	s := e.Sregs(convert[kvm.Sregs](v.t, *gs))
	require.NoError(v.t, gokvm.SetSregs(fd, ptr(convert[gokvm.Sregs](v.t, s))))
	regs := gokvm.Regs(e.Regs) // the same struct kvm_regs, field for field
	require.NoError(v.t, gokvm.SetRegs(fd, &regs))
}

func ptr[T any](v T) *T { return &v }

// convert copies between two Go declarations of one kernel structure
// (struct kvm_sregs here), which encoding/binary lays out alike.
func convert[To, From any](t *testing.T, f From) To {
	var b bytes.Buffer
	require.NoError(t, binary.Write(&b, binary.LittleEndian, f))
	var to To
	require.NoError(t, binary.Read(&b, binary.LittleEndian, &to))
	return to
}

// kvm_run offsets (include/uapi/linux/kvm.h).
const (
	runExitReason = 8
	runUnion      = 32
)

// run runs the vCPU until done says the serial output is complete, or for
// at most limit. A watchdog kicks the vCPU thread out of KVM_RUN with a
// signal (which KVM_RUN answers with EINTR) once the time is up.
func (v *rawVM) run(limit time.Duration, done func([]byte) bool) ([]byte, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := unix.Gettid()
	var stop atomic.Bool
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		select {
		case <-finished:
			return
		case <-time.After(limit):
		}
		stop.Store(true)
		for tick := time.NewTicker(50 * time.Millisecond); ; {
			_ = unix.Tgkill(unix.Getpid(), tid, unix.SIGURG) // Go's own preemption signal: harmless
			select {
			case <-finished:
				tick.Stop()
				return
			case <-tick.C:
			}
		}
	}()
	le := binary.LittleEndian
	fd := v.cpu.Fd()
	for {
		if stop.Load() {
			return v.serial.Bytes(), fmt.Errorf("no complete memory map on the serial port after %v (emulator fix-ups %v)", limit, v.fixes)
		}
		if err := gokvm.Run(fd); err != nil { // EINTR and EAGAIN are nil
			return v.serial.Bytes(), fmt.Errorf("KVM_RUN: %w", err)
		}
		switch reason := le.Uint32(v.page[runExitReason:]); reason {
		case uint32(kvm.ExitIO):
			v.io()
			if done(v.serial.Bytes()) {
				return v.serial.Bytes(), nil
			}
		case uint32(kvm.ExitMMIO):
			if v.page[runUnion+20] == 0 { // a read of nothing: all ones, as an empty bus reads
				for i := range 8 {
					v.page[runUnion+8+i] = 0xff
				}
			}
		case uint32(kvm.ExitIntr):
		case uint32(kvm.ExitInternalError):
			if err := v.emulationFailure(); err != nil {
				return v.serial.Bytes(), err
			}
		default:
			regs, _ := gokvm.GetRegs(fd)
			return v.serial.Bytes(), fmt.Errorf("exit %v at rip %#x", kvm.ExitReason(reason), regs.RIP)
		}
	}
}

// io answers a port access: COM1's transmitter collects bytes, its line
// status says "transmitter empty" (THRE | TEMT), every other read gets all
// ones (no device).
func (v *rawVM) io() {
	le := binary.LittleEndian
	u := v.page[runUnion:]
	out, size, port, count, off := u[0] == 1, int(u[1]), le.Uint16(u[2:]), int(le.Uint32(u[4:])), le.Uint64(u[8:])
	data := v.page[off : off+uint64(size*count)]
	const com1 = 0x3f8
	for i := range count {
		b := data[i*size : (i+1)*size]
		switch {
		case out && port == com1+3: // LCR
			v.dlab = b[0]&0x80 != 0
		case out && port == com1 && !v.dlab:
			v.serial.WriteByte(b[0])
		case out:
		case port == com1+5: // LSR
			b[0] = 0x60
		case port >= com1 && port < com1+8:
			clear(b)
		default:
			for j := range b {
				b[j] = 0xff
			}
		}
	}
}

// emulationFailure works around an instruction KVM's emulator cannot run
// (hosts without hardware virtualization emulate every instruction), as the
// note on this host lists them: int3 is delivered as a #BP after it, clac
// and stac set RFLAGS.AC themselves, fwait does nothing. Anything else ends
// the run, naming the bytes. Test-harness code only: a VMM on hardware
// virtualization never sees these.
func (v *rawVM) emulationFailure() error {
	le := binary.LittleEndian
	fd := v.cpu.Fd()
	if sub := le.Uint32(v.page[runUnion:]); sub != 1 { // KVM_INTERNAL_ERROR_EMULATION
		return fmt.Errorf("internal error, suberror %d", sub)
	}
	regs, err := gokvm.GetRegs(fd)
	if err != nil {
		return err
	}
	insn := make([]byte, 15)
	if le.Uint64(v.page[runUnion+8:])&1 != 0 { // KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
		insn = v.page[runUnion+17 : runUnion+17+int(v.page[runUnion+16])]
	} else {
		tr := &gokvm.Translation{LinearAddress: regs.RIP}
		if err := gokvm.Translate(fd, tr); err != nil || tr.Valid == 0 {
			return fmt.Errorf("emulation failure at rip %#x, which does not translate (%v)", regs.RIP, err)
		}
		if _, err := v.mem.ReadAt(insn, int64(tr.PhysicalAddress)); err != nil {
			return fmt.Errorf("emulation failure at rip %#x: %w", regs.RIP, err)
		}
	}
	const rflagsAC = 1 << 18
	switch {
	case bytes.HasPrefix(insn, []byte{0xcc}): // int3
		regs.RIP++
		if err := gokvm.SetRegs(fd, regs); err != nil {
			return err
		}
		ev := &gokvm.VCPUEvents{}
		if err := gokvm.GetVCPUEvents(fd, ev); err != nil {
			return err
		}
		ev.E.Inject, ev.E.Nr = 1, 3
		v.fixes["int3"]++
		return gokvm.SetVCPUEvents(fd, ev)
	case bytes.HasPrefix(insn, []byte{0x0f, 0x01, 0xca}): // clac
		regs.RFLAGS &^= rflagsAC
		regs.RIP += 3
		v.fixes["clac"]++
	case bytes.HasPrefix(insn, []byte{0x0f, 0x01, 0xcb}): // stac
		regs.RFLAGS |= rflagsAC
		regs.RIP += 3
		v.fixes["stac"]++
	case bytes.HasPrefix(insn, []byte{0x9b}): // fwait
		regs.RIP++
		v.fixes["fwait"]++
	default:
		return fmt.Errorf("emulation failure at rip %#x: % x", regs.RIP, insn)
	}
	return gokvm.SetRegs(fd, regs)
}
