//go:build amd64

package vmm

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Sentinel errors. Every error of this package wraps one of them, a sentinel
// of the package it comes from (kvm, guestmem, boot), or an
// *os.SyscallError naming the ioctl.
var (
	// ErrConfig: a Config that New or Restore cannot use. Wrapped in a
	// *ConfigError that names the field.
	ErrConfig = errors.New("invalid configuration")
	// ErrGuestStopped: the guest stopped itself — it asked for a reset,
	// its vCPU shut down (a triple fault), or it halted with nothing to
	// wake it. Wrapped in a *StopError that says which. Run returns it; a
	// kernel booted with panic=-1 ends this way after a panic.
	ErrGuestStopped = errors.New("the guest stopped")
	// ErrEmulation: KVM's instruction emulator could not run a guest
	// instruction (KVM_INTERNAL_ERROR_EMULATION). Wrapped in an
	// *EmulationError.
	ErrEmulation = errors.New("KVM's instruction emulator cannot run the instruction")
	// ErrRunning: Run was called while another Run of the same VM is in
	// progress.
	ErrRunning = errors.New("the VM is already running")
	// ErrClosed: the VM was closed. It is fs.ErrClosed, as for an
	// *os.File and the kvm and guestmem packages.
	ErrClosed = fs.ErrClosed
)

// The snapshot sentinels are guestmem's, so that one errors.Is check covers
// a bad memory stream and a bad state record alike. Restore's errors about
// the state record are *StateError; those about the memory stream are
// guestmem's *SnapshotError.
var (
	ErrSnapshotFormat    = guestmem.ErrSnapshotFormat    // not a snapshot, or a malformed record
	ErrSnapshotVersion   = guestmem.ErrSnapshotVersion   // a version this package does not read
	ErrSnapshotChecksum  = guestmem.ErrSnapshotChecksum  // the record does not match its checksum
	ErrSnapshotTruncated = guestmem.ErrSnapshotTruncated // the stream ends inside the record
)

// ConfigError reports a Config field New or Restore refuses. It wraps
// ErrConfig, and the cause when there is one (a *guestmem.LayoutError, a
// boot error).
type ConfigError struct {
	Field   string // the Config field: "Kernel", "Size", "Cmdline", ...
	Problem string // what is wrong with it
	Err     error  // the cause, or nil
}

func (e *ConfigError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("vmm: Config.%s: %s: %v", e.Field, e.Problem, e.Err)
	}
	return fmt.Sprintf("vmm: Config.%s: %s", e.Field, e.Problem)
}

// Unwrap returns ErrConfig and the cause.
func (e *ConfigError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrConfig, e.Err}
	}
	return []error{ErrConfig}
}

// StopError says how the guest stopped itself. It wraps ErrGuestStopped.
type StopError struct {
	// Reason is one of "reset" (a write of the reset command 0xfe to the
	// keyboard controller at port 0x64, or of the reset bit to port
	// 0xcf9), "shutdown" (KVM_EXIT_SHUTDOWN: a triple fault, which is how
	// Linux reboots when all else fails, or how a guest dies) and "halt"
	// (KVM_EXIT_HLT).
	Reason string
	RIP    uint64 // where the vCPU was
}

func (e *StopError) Error() string {
	what := map[string]string{
		"reset":    "asked for a reset",
		"shutdown": "shut down (triple fault)",
		"halt":     "halted",
	}[e.Reason]
	if what == "" {
		what = e.Reason
	}
	return fmt.Sprintf("vmm: the guest %s at rip %#x", what, e.RIP)
}

// Unwrap returns ErrGuestStopped.
func (e *StopError) Unwrap() error { return ErrGuestStopped }

// EmulationError is an instruction KVM's instruction emulator could not run.
// It wraps ErrEmulation. On a host without hardware virtualization, where
// the emulator runs every guest instruction, a few instructions Linux uses
// are missing from it; Config.EmulatorWorkarounds steps over those (Fix
// names the one that applies).
type EmulationError struct {
	RIP   uint64 // the instruction's address (RIP)
	Bytes []byte // the bytes at RIP, as many as could be read (up to 15)
	Fix   string // the workaround for it ("int3", "clac", "stac", "fwait"), or "" if there is none
	Err   error  // why the bytes could not be read, or nil
}

func (e *EmulationError) Error() string {
	s := fmt.Sprintf("vmm: KVM's instruction emulator cannot run the instruction at rip %#x", e.RIP)
	switch {
	case len(e.Bytes) > 0:
		s += ": " + spaced(e.Bytes)
	case e.Err != nil:
		s += fmt.Sprintf(" (unreadable: %v)", e.Err)
	}
	if e.Fix != "" {
		s += fmt.Sprintf(" (%s; Config.EmulatorWorkarounds steps over it on hosts without hardware virtualization)", e.Fix)
	}
	return s
}

// Unwrap returns ErrEmulation.
func (e *EmulationError) Unwrap() error { return ErrEmulation }

func spaced(b []byte) string {
	h := hex.EncodeToString(b)
	out := make([]byte, 0, len(h)+len(b))
	for i := 0; i < len(h); i += 2 {
		if i > 0 {
			out = append(out, ' ')
		}
		out = append(out, h[i], h[i+1])
	}
	return string(out)
}

// StateError reports a state record (the machine state Save writes before
// guest memory) that Restore cannot use. It wraps one of the snapshot
// sentinels.
type StateError struct {
	Offset  int64  // byte offset in the stream of the part at fault
	Section string // the section's tag, or "" for the header or checksum
	Err     error  // a snapshot sentinel, possibly wrapping detail
}

func (e *StateError) Error() string {
	if e.Section != "" {
		return fmt.Sprintf("vmm: state record, section %q at byte %d: %v", e.Section, e.Offset, e.Err)
	}
	return fmt.Sprintf("vmm: state record at byte %d: %v", e.Offset, e.Err)
}

// Unwrap returns the cause.
func (e *StateError) Unwrap() error { return e.Err }
