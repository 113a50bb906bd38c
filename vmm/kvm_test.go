//go:build amd64

package vmm

import (
	"bytes"
	"context"
	"errors"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// The tests below run guests on KVM: they skip without /dev/kvm, and fail
// under GMEM_REQUIRE_KVM=1 (set by .ci/run on hosts that have it).

// runAsync runs v in a goroutine; the channel gets Run's result.
func runAsync(ctx context.Context, v *VM) <-chan error {
	done := make(chan error, 1)
	go func() { done <- v.Run(ctx) }()
	return done
}

// waitFor polls until cond holds, failing t after limit.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after %v", what, limit)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitForBoot is waitFor for a kernel booting: it also fails as soon as the
// VM's Run (done) returns, with its error, and either failure shows the
// console's last 3 KiB, so a boot that stopped says where.
func waitForBoot(t *testing.T, limit time.Duration, what string, done <-chan error, console *syncBuffer,
	cond func() bool) {
	t.Helper()
	tail := func() string {
		b := console.Bytes()
		return string(b[max(0, len(b)-3<<10):])
	}
	deadline := time.After(limit)
	for !cond() {
		select {
		case err := <-done:
			t.Fatalf("the VM stopped (%v) before the %s; the console ends:\n%s", err, what, tail())
		case <-deadline:
			t.Fatalf("no %s after %v; the console ends:\n%s", what, limit, tail())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// TestTinyKernelOnKVM boots a kernel of a few instructions through PVH: it
// writes to COM1, reads its line status and an empty port, and asks for a
// reset, which ends Run.
func TestTinyKernelOnKVM(t *testing.T) {
	testenv.KVM(t)
	noLeaks(t)
	var console bytes.Buffer
	v, err := New(Config{Kernel: bytes.NewReader(tinyKernel(helloAndReset)), Size: 16 * kMiB, Console: &console})
	require.NoError(t, err)
	defer func() { require.NoError(t, v.Close()) }()
	require.Equal(t, boot.PVH, v.Entry().Protocol)

	err = v.Run(context.Background())
	var se *StopError
	require.ErrorAs(t, err, &se)
	require.ErrorIs(t, err, ErrGuestStopped)
	require.Equal(t, "reset", se.Reason)
	require.Equal(t, "hi\x60\xff", console.String(), "two bytes, LSR = THRE|TEMT, an empty port's all ones")
	st := v.Stats()
	require.Equal(t, uint64(4), st.ConsoleBytes)
	require.Equal(t, uint64(7), st.IOExits, "four OUTs to COM1, its LSR, port 0x70, port 0x64")
	require.Empty(t, st.Workarounds)
}

// TestPauseSaveRestoreOnKVM runs a guest that counts on COM1 (0, 1, ...,
// 255, 0, ...) and checks the VM's controls against the count: a paused
// guest writes nothing until Resume; Kick ends Run; a snapshot restored
// into a new VM goes on with the next number, exactly; Close ends a Run in
// progress.
func TestPauseSaveRestoreOnKVM(t *testing.T) {
	testenv.KVM(t)
	noLeaks(t)
	ctx := context.Background()
	var console syncBuffer
	v, err := New(Config{Kernel: bytes.NewReader(tinyKernel(counter)), Size: 16 * kMiB, Console: &console})
	require.NoError(t, err)
	defer v.Close()

	done := runAsync(ctx, v)
	waitFor(t, 30*time.Second, "counting", func() bool { return len(console.Bytes()) >= 1000 })
	require.ErrorIs(t, v.Run(ctx), ErrRunning)

	start := time.Now()
	require.NoError(t, v.Pause(ctx))
	t.Logf("Pause took %v", time.Since(start))
	require.True(t, v.Paused())
	n := len(console.Bytes())
	time.Sleep(50 * time.Millisecond)
	require.Len(t, console.Bytes(), n, "a paused guest writes nothing")
	regs, err := v.VCPU().Regs()
	require.NoError(t, err)
	last := console.Bytes()[n-1]
	require.Contains(t, []byte{last, last + 1}, byte(regs.RAX), "AL holds the count")

	v.Resume()
	waitFor(t, 30*time.Second, "counting after Resume", func() bool { return len(console.Bytes()) >= n+1000 })
	v.Kick()
	require.NoError(t, <-done, "Kick ends Run with nil")
	out := console.Bytes()
	checkCounting(t, out)

	var snap bytes.Buffer
	start = time.Now()
	require.NoError(t, v.Save(ctx, &snap))
	t.Logf("Save of a 16 MiB guest: %d bytes in %v", snap.Len(), time.Since(start))
	require.False(t, v.Paused(), "Save resumes the VM it paused")

	// Close while the guest runs: Run returns ErrClosed.
	done = runAsync(ctx, v)
	waitFor(t, 30*time.Second, "counting again", func() bool { return len(console.Bytes()) > len(out)+100 })
	require.NoError(t, v.Close())
	require.ErrorIs(t, <-done, ErrClosed)
	require.ErrorIs(t, v.Run(ctx), ErrClosed)

	var console2 syncBuffer
	start = time.Now()
	w, err := Restore(ctx, bytes.NewReader(snap.Bytes()), Config{Console: &console2})
	require.NoError(t, err)
	t.Logf("Restore: %v", time.Since(start))
	defer func() { require.NoError(t, w.Close()) }()
	require.Nil(t, w.Entry())
	done = runAsync(ctx, w)
	waitFor(t, 30*time.Second, "counting in the restored VM", func() bool { return len(console2.Bytes()) >= 1000 })

	// A paused VM's snapshot, taken where the console stopped; Save leaves
	// it paused.
	require.NoError(t, w.Pause(ctx))
	at := console2.Bytes()
	var snap2 bytes.Buffer
	require.NoError(t, w.Save(ctx, &snap2))
	require.True(t, w.Paused())
	w.Resume()
	w.Kick()
	require.NoError(t, <-done)

	got := console2.Bytes()
	require.Equal(t, out[len(out)-1]+1, got[0], "the restored guest goes on with the next number")
	checkCounting(t, got)

	var console3 syncBuffer
	x, err := Restore(ctx, &snap2, Config{Console: &console3, Size: 16 * kMiB})
	require.NoError(t, err)
	defer func() { require.NoError(t, x.Close()) }()
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	require.ErrorIs(t, x.Run(rctx), context.DeadlineExceeded)
	require.NotEmpty(t, console3.Bytes())
	require.Equal(t, at[len(at)-1]+1, console3.Bytes()[0], "a paused VM's snapshot goes on from the pause")
}

// checkCounting checks out counts up by one, modulo 256.
func checkCounting(t *testing.T, out []byte) {
	t.Helper()
	for i := 1; i < len(out); i++ {
		if out[i] != out[i-1]+1 {
			t.Fatalf("byte %d is %#x after %#x", i, out[i], out[i-1])
		}
	}
}

// TestInt3OnKVM runs int3 with no IDT: with hardware virtualization the CPU
// takes #BP, cannot deliver it and shuts down; in KVM's emulator (a host
// without it) int3 is an emulation failure, an *EmulationError naming the
// workaround, unless EmulatorWorkarounds delivers the #BP itself — and then
// it shuts down the same way.
func TestInt3OnKVM(t *testing.T) {
	testenv.KVM(t)
	noLeaks(t)
	for _, workarounds := range []bool{false, true} {
		var console bytes.Buffer
		v, err := New(Config{Kernel: bytes.NewReader(tinyKernel(int3Then)), Size: 16 * kMiB, Console: &console,
			EmulatorWorkarounds: workarounds})
		require.NoError(t, err)
		err = v.Run(context.Background())
		st := v.Stats()
		require.NoError(t, v.Close())
		require.Equal(t, "a", console.String())
		var ee *EmulationError
		var se *StopError
		switch {
		case errors.As(err, &ee):
			require.False(t, workarounds, "with the workarounds int3 is delivered: %v", err)
			require.Equal(t, "int3", ee.Fix)
			require.Equal(t, byte(0xcc), ee.Bytes[0])
			t.Logf("workarounds off: %v (KVM emulates this guest)", err)
		case errors.As(err, &se):
			require.Equal(t, "shutdown", se.Reason)
			t.Logf("workarounds %v: %v, workarounds applied %v", workarounds, err, st.Workarounds)
		default:
			t.Fatalf("Run: %v", err)
		}
	}
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
	for _, l := range lines[1 : len(lines)-1] {
		if !e820Line.MatchString(l) {
			return true
		}
	}
	return false
}

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

// TestDebianBootSaveRestoreOnKVM boots Debian's vmlinux through vmm with RAM
// below and above 4 GiB, until it has printed its memory map on the serial
// console (which must be the layout's), then pauses it, saves it, closes
// it, restores the snapshot into a new VM and runs that until the kernel
// prints more. Where KVM emulates every instruction the map comes about
// 15 s into the boot; each phase is logged with its time.
func TestDebianBootSaveRestoreOnKVM(t *testing.T) {
	testenv.KVM(t)
	path := debianVmlinux(t)
	noLeaks(t)
	ctx := context.Background()
	kernel, err := os.Open(path)
	require.NoError(t, err)
	defer kernel.Close()
	layout := guestmem.Layout{{GPA: 0, Size: 128 * kMiB}, {GPA: 4 * kGiB, Size: 64 * kMiB}}
	var console syncBuffer
	start := time.Now()
	v, err := New(Config{Kernel: kernel, Cmdline: DefaultCmdline + " " + EmulatorCmdline, Layout: layout,
		Console: &console, EmulatorWorkarounds: true})
	require.NoError(t, err)
	defer v.Close()
	t.Logf("New (memory, kernel loaded, VM): %v", time.Since(start).Round(time.Millisecond))

	start = time.Now()
	done := runAsync(ctx, v)
	waitFor(t, time.Minute, "complete memory map on the serial console", func() bool { return e820Printed(console.Bytes()) })
	t.Logf("the kernel printed its memory map after %v", time.Since(start).Round(time.Millisecond))
	want, err := boot.MemoryMap(layout)
	require.NoError(t, err)
	require.Equal(t, want, parseE820(t, console.Bytes()))

	start = time.Now()
	require.NoError(t, v.Pause(ctx))
	var snap bytes.Buffer
	require.NoError(t, v.Save(ctx, &snap))
	t.Logf("Pause and Save: %d bytes in %v", snap.Len(), time.Since(start).Round(time.Millisecond))
	require.NoError(t, v.Close())
	require.ErrorIs(t, <-done, ErrClosed)
	before := console.Bytes()
	t.Logf("serial output before the snapshot (%v):\n%s", v.Stats(), before)

	var console2 syncBuffer
	start = time.Now()
	w, err := Restore(ctx, &snap, Config{Console: &console2, Layout: layout, EmulatorWorkarounds: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, w.Close()) }()
	t.Logf("Restore: %v", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	done = runAsync(ctx, w)
	waitFor(t, 30*time.Second, "line from the restored kernel", func() bool { return bytes.Count(console2.Bytes(), []byte("\n")) >= 2 })
	t.Logf("the restored kernel printed %q after %v", console2.Bytes(), time.Since(start).Round(time.Millisecond))
	w.Kick()
	require.NoError(t, <-done)
	require.NotContains(t, string(console2.Bytes()), "Linux version", "it goes on; it does not boot again")
}
