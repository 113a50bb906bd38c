//go:build amd64

package vmm

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// TestIoctlNumbers: the requests built with gokvm's encoders from this
// package's structure sizes are <linux/kvm.h>'s (as printed by a C program
// including it on x86-64), so the sizes are the kernel's too.
func TestIoctlNumbers(t *testing.T) {
	for _, tc := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"KVM_SET_IDENTITY_MAP_ADDR", reqSetIdentityMapAddr, 0x4008ae48},
		{"KVM_IRQ_LINE", reqIRQLine, 0x4008ae61},
		{"KVM_GET_IRQCHIP", reqGetIRQChip, 0xc208ae62},
		{"KVM_SET_IRQCHIP", reqSetIRQChip, 0x8208ae63},
		{"KVM_SET_CLOCK", reqSetClock, 0x4030ae7b},
		{"KVM_GET_CLOCK", reqGetClock, 0x8030ae7c},
		{"KVM_TRANSLATE", reqTranslate, 0xc018ae85},
		{"KVM_GET_MSRS", reqGetMSRs, 0xc008ae88},
		{"KVM_SET_MSRS", reqSetMSRs, 0x4008ae89},
		{"KVM_GET_FPU", reqGetFPU, 0x81a0ae8c},
		{"KVM_SET_FPU", reqSetFPU, 0x41a0ae8d},
		{"KVM_GET_LAPIC", reqGetLAPIC, 0x8400ae8e},
		{"KVM_SET_LAPIC", reqSetLAPIC, 0x4400ae8f},
		{"KVM_GET_MP_STATE", reqGetMPState, 0x8004ae98},
		{"KVM_SET_MP_STATE", reqSetMPState, 0x4004ae99},
		{"KVM_GET_PIT2", reqGetPIT2, 0x8070ae9f},
		{"KVM_SET_PIT2", reqSetPIT2, 0x4070aea0},
		{"KVM_GET_VCPU_EVENTS", reqGetEvents, 0x8040ae9f},
		{"KVM_SET_VCPU_EVENTS", reqSetEvents, 0x4040aea0},
		{"KVM_GET_DEBUGREGS", reqGetDebugRegs, 0x8080aea1},
		{"KVM_SET_DEBUGREGS", reqSetDebugRegs, 0x4080aea2},
		{"KVM_GET_XSAVE", reqGetXSAVE, 0x9000aea4},
		{"KVM_SET_XSAVE", reqSetXSAVE, 0x5000aea5},
		{"KVM_GET_XCRS", reqGetXCRS, 0x8188aea6},
		{"KVM_SET_XCRS", reqSetXCRS, 0x4188aea7},
		{"KVM_GET_XSAVE2", reqGetXSAVE2, 0x9000aecf},
	} {
		require.Equalf(t, tc.want, tc.got, "%s: %#x", tc.name, tc.got)
	}
}

// TestIoctlShortBuffer: a buffer smaller than its request is refused before
// the kernel could write past it.
func TestIoctlShortBuffer(t *testing.T) {
	_, err := ioctl(^uintptr(0), "KVM_GET_LAPIC", reqGetLAPIC, make([]byte, sizeLAPIC-1))
	require.ErrorIs(t, err, errShortBuffer)
	_, err = ioctl(^uintptr(0), "KVM_GET_LAPIC", reqGetLAPIC, nil)
	require.ErrorIs(t, err, errShortBuffer)
}

// TestNormalizeCPUID: the hypervisor bit and the vCPU's APIC ID, and
// nothing else, change.
func TestNormalizeCPUID(t *testing.T) {
	in := []gokvm.CPUIDEntry2{
		{Function: 0, Eax: 0x16, Ebx: 0x756e6547},
		{Function: 1, Eax: 0x806ec, Ebx: 0x0a100800, Ecx: 0x7ffafbff, Edx: 0xbfebfbff},
		{Function: 7, Ebx: 0x029c67af},
		{Function: 0xb, Index: 0, Eax: 1, Ebx: 2, Ecx: 0x100, Edx: 0x0a},
		{Function: 0xb, Index: 1, Eax: 4, Ebx: 8, Ecx: 0x201, Edx: 0x0a},
		{Function: 0x1f, Index: 0, Edx: 0x0a},
		{Function: 0x40000001, Eax: 0x01007afb},
	}
	out := append([]gokvm.CPUIDEntry2(nil), in...)
	normalizeCPUID(out, 0)
	want := append([]gokvm.CPUIDEntry2(nil), in...)
	want[1].Ecx |= 1 << 31
	want[1].Ebx = 0x00100800
	want[3].Edx, want[4].Edx, want[5].Edx = 0, 0, 0
	require.Equal(t, want, out)
	normalizeCPUID(out, 3)
	require.Equal(t, uint32(0x03100800), out[1].Ebx)
	require.Equal(t, uint32(3), out[4].Edx)
}

// TestEmulatorFixes: the instructions with a workaround, and those without.
func TestEmulatorFixes(t *testing.T) {
	for _, tc := range []struct {
		insn []byte
		fix  string
		n    int
	}{
		{[]byte{0xcc, 0x90}, "int3", 1},
		{[]byte{0x0f, 0x01, 0xca, 0xc3}, "clac", 3},
		{[]byte{0x0f, 0x01, 0xcb}, "stac", 3},
		{[]byte{0x9b, 0xdb, 0xe2}, "fwait", 1},
		{[]byte{0x0f, 0x01}, "", 0},                   // cut short
		{[]byte{0xf3, 0x48, 0x0f, 0xb8, 0xc7}, "", 0}, // popcnt: clearcpuid=popcnt instead
		{[]byte{0x0f, 0xae, 0x2f}, "", 0},             // xrstor: noxsave instead
		{nil, "", 0},
	} {
		fix, n := emulatorFix(tc.insn)
		require.Equal(t, tc.fix, fix, "% x", tc.insn)
		require.Equal(t, tc.n, n)
	}
	e := &EmulationError{RIP: 0xffffffff81000000, Bytes: []byte{0xcc, 0x90}, Fix: "int3"}
	require.ErrorIs(t, e, ErrEmulation)
	require.Equal(t, "vmm: KVM's instruction emulator cannot run the instruction at rip 0xffffffff81000000: cc 90 "+
		"(int3; Config.EmulatorWorkarounds steps over it on hosts without hardware virtualization)", e.Error())
	require.Equal(t, "vmm: the guest asked for a reset at rip 0x100000", (&StopError{Reason: "reset", RIP: 0x100000}).Error())
	require.ErrorIs(t, &StopError{Reason: "shutdown"}, ErrGuestStopped)
}

// TestPorts: the reset requests, and only them.
func TestPorts(t *testing.T) {
	require.True(t, isResetRequest(0x64, []byte{0xfe}))
	require.True(t, isResetRequest(0xcf9, []byte{0x06}))
	require.True(t, isResetRequest(0xcf9, []byte{0x0e}))
	require.False(t, isResetRequest(0xcf9, []byte{0x02}), "a hard reset is set up with 0x02, then done with 0x06")
	require.False(t, isResetRequest(0x64, []byte{0xaa}), "the controller self-test")
	require.False(t, isResetRequest(0x60, []byte{0xfe}), "the data port")
	require.False(t, isResetRequest(0xcf8, []byte{0x00, 0x04, 0x00, 0x80}), "a PCI configuration address")
	require.False(t, isResetRequest(0x64, []byte{0xfe, 0x00}), "a 16-bit write")
}

// TestNewFailsHalfWay: New that fails after guest memory exists — the
// kernel is not one, or KVM is not there — releases it all before it
// returns. Neither needs KVM.
func TestNewFailsHalfWay(t *testing.T) {
	noLeaks(t)
	_, err := New(Config{Kernel: bytes.NewReader(bytes.Repeat([]byte{0x90}, 8192)), Size: 64 * kMiB})
	require.ErrorIs(t, err, boot.ErrBadMagic)
	var ie *boot.ImageError
	require.ErrorAs(t, err, &ie)

	_, err = New(Config{Kernel: bytes.NewReader(tinyKernel(helloAndReset)), Layout: guestmem.Layout{{GPA: 0, Size: kMiB}},
		KVMPath: "/nonexistent/kvm"})
	require.ErrorAs(t, err, &ie, "a kernel at 1 MiB in a guest with 1 MiB of RAM")
	t.Log(err)

	_, err = New(Config{Kernel: bytes.NewReader(tinyKernel(helloAndReset)), Size: 16 * kMiB, KVMPath: "/nonexistent/kvm"})
	require.ErrorIs(t, err, kvm.ErrNoDevice)

	// A file that is not a KVM device: the same, from kvm.Open.
	p := filepath.Join(t.TempDir(), "kvm")
	require.NoError(t, os.WriteFile(p, nil, 0o600))
	_, err = New(Config{Kernel: bytes.NewReader(tinyKernel(helloAndReset)), Size: 16 * kMiB, KVMPath: p})
	require.ErrorIs(t, err, kvm.ErrNoDevice)
}
