//go:build amd64

package vmm

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"slices"

	"github.com/gmem-vmm/gmem/guestmem"
)

// The model-specific registers a snapshot keeps, in the order they are set
// back (QEMU's, in kvm_put_msrs): what Linux programs once and relies on
// (the SYSCALL and SYSENTER entry points, the kernel's GS base, PAT, the
// MTRRs), the TSC, and KVM's paravirtual MSRs (kvm-clock, async page
// faults, steal time, PV EOI), whose guest addresses the restored memory
// still holds. Those KVM_GET_MSRS refuses here are left out of the record.
// The TSC deadline goes last, after the LAPIC, which ignores it unless its
// timer is in TSC-deadline mode.
var snapshotMSRs = []uint32{
	// IA32_SYSENTER_CS, _ESP and _EIP; STAR, LSTAR, CSTAR and SFMASK (the
	// SYSCALL entry); KERNEL_GS_BASE; TSC_AUX.
	0x174, 0x175, 0x176, 0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000102, 0xc0000103,
	// IA32_TSC, IA32_TSC_ADJUST, IA32_MISC_ENABLE, IA32_PAT, IA32_SPEC_CTRL.
	0x10, 0x3b, 0x1a0, 0x277, 0x48,
	// The MTRRs: default type, variable ranges, fixed ranges.
	0x2ff,
	0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f,
	0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
	// KVM's: the original kvm-clock MSRs, then WALL_CLOCK_NEW and
	// SYSTEM_TIME_NEW; ASYNC_PF_INT before ASYNC_PF_EN, which needs it;
	// STEAL_TIME, PV_EOI_EN, POLL_CONTROL.
	0x11, 0x12, 0x4b564d00, 0x4b564d01, 0x4b564d06, 0x4b564d02, 0x4b564d03, 0x4b564d04, 0x4b564d05,
	msrTSCDeadline,
}

const msrTSCDeadline = 0x6e0 // IA32_TSC_DEADLINE

// Save writes a snapshot of the VM to w: the state record (the vCPU's
// registers, FPU and MSRs, its LAPIC and pending events, the PIC, IOAPIC and
// PIT, kvm-clock, the UART; docs/vmm.md has the format), then guest memory
// (guestmem.Save, a full snapshot). It pauses the VM first (Pause), and
// resumes it at the end unless it was paused already; a Run in progress
// waits meanwhile. Restore makes a new VM from what it wrote.
func (v *VM) Save(ctx context.Context, w io.Writer) error {
	if v.closed.Load() {
		return fmt.Errorf("vmm: Save: %w", ErrClosed)
	}
	wasPaused := v.kvm.Paused()
	if !wasPaused {
		defer v.Resume()
	}
	if err := v.Pause(ctx); err != nil {
		return err
	}
	// The last exit's answer (an IN, an MMIO read) reaches the registers
	// only with the next KVM_RUN: complete it now, without running the
	// guest, or the snapshot would hold the vCPU before it.
	if err := v.cpu.Complete(); err != nil {
		return err
	}
	st, err := v.captureState()
	if err != nil {
		return err
	}
	if _, err := w.Write(st.marshal()); err != nil {
		return fmt.Errorf("vmm: Save: writing the state record: %w", err)
	}
	if _, err := v.mem.Save(ctx, w, guestmem.SaveOptions{}); err != nil {
		return fmt.Errorf("saving guest memory: %w", err)
	}
	return nil
}

// Restore makes a new VM from a snapshot Save wrote, read from r to its end:
// the state record, then guest memory (guestmem.Restore, eagerly, with
// cfg.MemoryOptions). The machine is built as New builds it, and the saved
// state set on it; Run continues the guest where it was saved. cfg gives the
// console, EmulatorWorkarounds, KVMPath and MemoryOptions; Kernel, Initrd,
// InitrdSize and Cmdline must be empty (a *ConfigError), and Size or Layout,
// if set, must be the snapshot's layout (else guestmem.ErrSnapshotLayout).
//
// A malformed, truncated or corrupt snapshot is a *StateError (the state
// record) or a *guestmem.SnapshotError (memory), each wrapping one of the
// ErrSnapshot sentinels, and no VM: whatever was made is released.
func Restore(ctx context.Context, r io.Reader, cfg Config) (*VM, error) {
	if err := cfg.validateRestore(); err != nil {
		return nil, err
	}
	layout, _ := cfg.layout(false)
	st, err := readState(r)
	if err != nil {
		return nil, err
	}
	opts := slices.Clone(cfg.MemoryOptions)
	if layout != nil {
		opts = append(opts, guestmem.WithLayout(layout))
	}
	v := newVM(cfg)
	ok := false
	defer func() {
		if !ok {
			v.Close()
		}
	}()
	if v.mem, err = guestmem.Restore(ctx, []io.Reader{r}, opts...); err != nil {
		return nil, fmt.Errorf("restoring guest memory: %w", err)
	}
	if err := v.newMachine(); err != nil {
		return nil, err
	}
	if err := v.applyState(st); err != nil {
		return nil, err
	}
	ok = true
	return v, nil
}

// captureState reads the machine's state. The VM must be paused.
func (v *VM) captureState() (*machineState, error) {
	st := &machineState{UART: v.uart.state()}
	var err error
	if st.Regs, err = v.cpu.Regs(); err != nil {
		return nil, err
	}
	if st.Sregs, err = v.cpu.Sregs(); err != nil {
		return nil, err
	}
	get := func(vcpu bool, name string, req uintptr, size int) []byte {
		if err != nil {
			return nil
		}
		b := make([]byte, size)
		_, err = v.fdIoctl(vcpu, name, req, b)
		return b
	}
	switch n := v.caps.xsaveSize; {
	case n > sizeXSAVE:
		st.XSAVE = get(true, "KVM_GET_XSAVE2", reqGetXSAVE2, n)
	case n > 0:
		st.XSAVE = get(true, "KVM_GET_XSAVE", reqGetXSAVE, n)
	default:
		st.FPU = get(true, "KVM_GET_FPU", reqGetFPU, sizeFPU)
	}
	if v.caps.xcrs {
		st.XCRS = get(true, "KVM_GET_XCRS", reqGetXCRS, sizeXCRS)
	}
	st.LAPIC = get(true, "KVM_GET_LAPIC", reqGetLAPIC, sizeLAPIC)
	st.Events = get(true, "KVM_GET_VCPU_EVENTS", reqGetEvents, sizeEvents)
	st.MPState = get(true, "KVM_GET_MP_STATE", reqGetMPState, sizeMPState)
	if v.caps.debugRegs {
		st.DebugRegs = get(true, "KVM_GET_DEBUGREGS", reqGetDebugRegs, sizeDebugRegs)
	}
	st.PICMaster, st.PICSlave, st.IOAPIC = v.getIRQChip(0, &err), v.getIRQChip(1, &err), v.getIRQChip(2, &err)
	st.PIT = get(false, "KVM_GET_PIT2", reqGetPIT2, sizePIT2)
	st.Clock = get(false, "KVM_GET_CLOCK", reqGetClock, sizeClock)
	if err != nil {
		return nil, err
	}
	if st.MSRs, err = v.getMSRs(snapshotMSRs); err != nil {
		return nil, err
	}
	return st, nil
}

// getIRQChip reads interrupt controller chip (0 and 1 the PICs, 2 the
// IOAPIC) into a struct kvm_irqchip, unless *errp is set already.
func (v *VM) getIRQChip(chip uint32, errp *error) []byte {
	if *errp != nil {
		return nil
	}
	b := make([]byte, sizeIRQChip)
	binary.LittleEndian.PutUint32(b, chip)
	_, *errp = v.fdIoctl(false, "KVM_GET_IRQCHIP", reqGetIRQChip, b)
	return b
}

// applyState sets a captured state on a new machine, in the order KVM
// needs (QEMU's, in kvm_arch_put_registers): the interrupt controllers and
// the PIT; the registers, FPU and XCR0, then the special registers (the
// APIC base among them) before the MSRs and the LAPIC, the TSC deadline
// after the LAPIC, the pending events and debug registers; kvm-clock last,
// so the guest's clock goes on from where it was saved.
func (v *VM) applyState(st *machineState) error {
	var err error
	set := func(vcpu bool, name string, req uintptr, b []byte) {
		if err == nil && b != nil {
			_, err = v.fdIoctl(vcpu, name, req, b)
		}
	}
	set(false, "KVM_SET_IRQCHIP", reqSetIRQChip, st.PICMaster)
	set(false, "KVM_SET_IRQCHIP", reqSetIRQChip, st.PICSlave)
	set(false, "KVM_SET_IRQCHIP", reqSetIRQChip, st.IOAPIC)
	set(false, "KVM_SET_PIT2", reqSetPIT2, st.PIT)
	if err != nil {
		return err
	}
	if err := v.cpu.SetRegs(st.Regs); err != nil {
		return err
	}
	switch {
	case st.XSAVE != nil:
		if v.caps.xsaveSize == 0 {
			return fmt.Errorf("vmm: Restore: the snapshot has XSAVE state and this KVM has no KVM_CAP_XSAVE")
		}
		// KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says.
		b := make([]byte, max(len(st.XSAVE), v.caps.xsaveSize))
		copy(b, st.XSAVE)
		set(true, "KVM_SET_XSAVE", reqSetXSAVE, b)
	default:
		set(true, "KVM_SET_FPU", reqSetFPU, st.FPU)
	}
	set(true, "KVM_SET_XCRS", reqSetXCRS, st.XCRS)
	if err != nil {
		return err
	}
	if err := v.cpu.SetSregs(st.Sregs); err != nil {
		return err
	}
	i := slices.IndexFunc(st.MSRs, func(m msr) bool { return m.Index == msrTSCDeadline })
	msrs, deadline := st.MSRs, []msr(nil)
	if i >= 0 {
		msrs, deadline = slices.Delete(slices.Clone(st.MSRs), i, i+1), st.MSRs[i:i+1]
	}
	if err := v.setMSRs(msrs); err != nil {
		return err
	}
	set(true, "KVM_SET_MP_STATE", reqSetMPState, st.MPState)
	set(true, "KVM_SET_LAPIC", reqSetLAPIC, st.LAPIC)
	if err != nil {
		return err
	}
	if err := v.setMSRs(deadline); err != nil {
		return err
	}
	// Set what the record holds: the NMI and SIPI state too, which
	// KVM_GET_VCPU_EVENTS reports without flagging.
	const validNMIPending, validSIPIVector = 1, 2
	ev := slices.Clone(st.Events)
	binary.LittleEndian.PutUint32(ev[20:], binary.LittleEndian.Uint32(ev[20:])|validNMIPending|validSIPIVector)
	set(true, "KVM_SET_VCPU_EVENTS", reqSetEvents, ev)
	if st.DebugRegs != nil && v.caps.debugRegs {
		set(true, "KVM_SET_DEBUGREGS", reqSetDebugRegs, st.DebugRegs)
	}
	// The clock as it was, without its flags: KVM_CLOCK_REALTIME would
	// advance it by the time the snapshot spent on disk.
	clock := slices.Clone(st.Clock)
	binary.LittleEndian.PutUint32(clock[8:], 0)
	set(false, "KVM_SET_CLOCK", reqSetClock, clock)
	if err != nil {
		return err
	}
	v.uart.setState(st.UART)
	return nil
}

// getMSRs reads the MSRs of indices that KVM has here, skipping the ones it
// refuses: KVM_GET_MSRS reads in order and stops at the first it cannot.
func (v *VM) getMSRs(indices []uint32) ([]msr, error) {
	var out []msr
	for len(indices) > 0 {
		b := make([]byte, sizeMSRsHeader+sizeMSREntry*len(indices))
		binary.LittleEndian.PutUint32(b, uint32(len(indices)))
		for i, idx := range indices {
			binary.LittleEndian.PutUint32(b[sizeMSRsHeader+sizeMSREntry*i:], idx)
		}
		n, err := v.fdIoctl(true, "KVM_GET_MSRS", reqGetMSRs, b)
		if err != nil {
			return nil, err
		}
		n = min(n, len(indices))
		for i := range n {
			e := b[sizeMSRsHeader+sizeMSREntry*i:]
			out = append(out, msr{Index: indices[i], Data: binary.LittleEndian.Uint64(e[8:])})
		}
		if n < len(indices) {
			n++ // indices[n] is one KVM does not have
		}
		indices = indices[n:]
	}
	return out, nil
}

// setMSRs sets ms. KVM_SET_MSRS sets in order and stops at the first MSR
// it refuses; one that still holds its reset value 0 is skipped (a KVM
// without that paravirtual feature, steal time without scheduler
// statistics), and any other refusal is an error naming the MSR.
func (v *VM) setMSRs(ms []msr) error {
	for len(ms) > 0 {
		b := make([]byte, sizeMSRsHeader+sizeMSREntry*len(ms))
		binary.LittleEndian.PutUint32(b, uint32(len(ms)))
		for i, m := range ms {
			e := b[sizeMSRsHeader+sizeMSREntry*i:]
			binary.LittleEndian.PutUint32(e, m.Index)
			binary.LittleEndian.PutUint64(e[8:], m.Data)
		}
		n, err := v.fdIoctl(true, "KVM_SET_MSRS", reqSetMSRs, b)
		if err != nil {
			return err
		}
		if n >= len(ms) {
			return nil
		}
		if ms[n].Data != 0 {
			return fmt.Errorf("vmm: Restore: KVM_SET_MSRS refused MSR %#x = %#x", ms[n].Index, ms[n].Data)
		}
		ms = ms[n+1:]
	}
	return nil
}
