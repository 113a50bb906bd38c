//go:build amd64

package vmm

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/gmem-vmm/gmem/guestmem"
)

// The instructions KVM's instruction emulator lacks that Linux uses, as
// measured on a host without hardware virtualization
// (/work/shared/notes/linux-boot-on-this-host.md in the project's notes;
// docs/vmm.md): each with its bytes and what stepping over it takes.
var emulatorFixes = []struct {
	name  string
	bytes []byte
}{
	{"int3", []byte{0xcc}},             // the int3 self-test, then live-patch sites: raise #BP after it
	{"clac", []byte{0x0f, 0x01, 0xca}}, // every interrupt entry with SMAP: clear RFLAGS.AC
	{"stac", []byte{0x0f, 0x01, 0xcb}}, // set RFLAGS.AC
	{"fwait", []byte{0x9b}},            // nothing to wait for
}

// emulatorFix returns the workaround for the instruction starting insn, and
// its length; "" if there is none.
func emulatorFix(insn []byte) (name string, n int) {
	for _, f := range emulatorFixes {
		if bytes.HasPrefix(insn, f.bytes) {
			return f.name, len(f.bytes)
		}
	}
	return "", 0
}

const (
	rflagsAC   = 1 << 18 // alignment check / access control (SMAP)
	vectorBP   = 3       // the breakpoint exception, #BP
	maxInsnLen = 15
	pageSize   = 4096
)

// emulationFailure handles an emulation failure: it reads the instruction,
// and, with Config.EmulatorWorkarounds, steps over it if it is one of
// emulatorFixes. Otherwise it returns the *EmulationError.
func (v *VM) emulationFailure() error {
	regs, err := v.cpu.Regs()
	if err != nil {
		return err
	}
	sregs, err := v.cpu.Sregs()
	if err != nil {
		return err
	}
	insn, readErr := v.fetch(sregs.CS.Base + regs.RIP)
	fix, n := emulatorFix(insn)
	if !v.cfg.EmulatorWorkarounds || fix == "" {
		return &EmulationError{RIP: regs.RIP, Bytes: insn, Fix: fix, Err: readErr}
	}
	regs.RIP += uint64(n)
	switch fix {
	case "int3":
		// KVM delivers an injected exception with the RIP it finds, as the
		// CPU would push it after executing int3.
		if err := v.cpu.SetRegs(regs); err != nil {
			return err
		}
		if err := v.injectException(vectorBP); err != nil {
			return err
		}
	case "clac":
		regs.RFLAGS &^= rflagsAC
	case "stac":
		regs.RFLAGS |= rflagsAC
	}
	if fix != "int3" {
		if err := v.cpu.SetRegs(regs); err != nil {
			return err
		}
	}
	v.stats.workaround(fix)
	return nil
}

// fetch reads up to 15 bytes at the guest linear address addr, translating
// each page with KVM_TRANSLATE; it returns what it could read, and why it
// stopped short.
func (v *VM) fetch(addr uint64) ([]byte, error) {
	var out []byte
	for len(out) < maxInsnLen {
		la := addr + uint64(len(out))
		gpa, err := v.translate(la)
		if err != nil {
			return out, err
		}
		n := min(maxInsnLen-len(out), int(pageSize-la%pageSize))
		buf := make([]byte, n)
		if _, err := v.mem.ReadAt(buf, int64(gpa)); err != nil {
			return out, fmt.Errorf("reading guest-physical %v: %w", guestmem.GuestAddress(gpa), err)
		}
		out = append(out, buf...)
	}
	return out, nil
}

// translate returns the guest-physical address of linear address la.
func (v *VM) translate(la uint64) (uint64, error) {
	b := make([]byte, sizeTranslation)
	binary.LittleEndian.PutUint64(b, la)
	if err := v.vcpuIoctl("KVM_TRANSLATE", reqTranslate, b); err != nil {
		return 0, err
	}
	if b[16] == 0 { // valid
		return 0, fmt.Errorf("linear address %#x is not mapped", la)
	}
	return binary.LittleEndian.Uint64(b[8:]), nil
}

// injectException makes the vCPU take exception vector when it next runs
// (KVM_SET_VCPU_EVENTS with exception.injected).
func (v *VM) injectException(vector uint8) error {
	ev := make([]byte, sizeEvents)
	if err := v.vcpuIoctl("KVM_GET_VCPU_EVENTS", reqGetEvents, ev); err != nil {
		return err
	}
	ev[0], ev[1], ev[2], ev[3] = 1, vector, 0, 0 // injected, nr, has_error_code, pending
	binary.LittleEndian.PutUint32(ev[4:], 0)     // error_code
	return v.vcpuIoctl("KVM_SET_VCPU_EVENTS", reqSetEvents, ev)
}
