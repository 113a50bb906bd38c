package fault

import (
	"errors"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// sink keeps loads from being optimised away.
var sink byte

func TestCatch(t *testing.T) {
	ps := os.Getpagesize()
	none, err := unix.Mmap(-1, 0, 2*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(t, err)
	defer unix.Munmap(none)
	require.NoError(t, unix.Mprotect(none[ps:], unix.PROT_NONE))

	fd, err := unix.MemfdCreate("fault test", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Ftruncate(fd, int64(2*ps)))
	file, err := unix.Mmap(fd, 0, 2*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(t, err)
	defer unix.Munmap(file)
	require.NoError(t, unix.Ftruncate(fd, int64(ps))) // the second page is past the end: SIGBUS

	for _, c := range []struct {
		name string
		mem  []byte
		fn   func(b []byte)
	}{
		{"SIGSEGV/read", none, func(b []byte) { sink = b[ps+7] }},
		{"SIGSEGV/write", none, func(b []byte) { b[ps+7] = 1 }},
		{"SIGBUS/read", file, func(b []byte) { sink = b[ps+7] }},
		{"SIGBUS/write", file, func(b []byte) { b[ps+7] = 1 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			addr, faulted := Catch(func() { c.mem[0] = 2; c.fn(c.mem) })
			require.True(t, faulted)
			require.Equal(t, addrOf(c.mem)+uintptr(ps)+7, addr)
			require.Equal(t, byte(2), c.mem[0], "what ran before the fault stays done")
		})
	}

	addr, faulted := Catch(func() { none[0] = 3 })
	require.False(t, faulted)
	require.Zero(t, addr)
}

func TestCatchRestoresTheSetting(t *testing.T) {
	for _, before := range []bool{false, true} {
		debug.SetPanicOnFault(before)
		inside := !before
		Catch(func() { inside = debug.SetPanicOnFault(true) })
		require.True(t, inside, "fn runs with faults as panics")
		require.Equal(t, before, debug.SetPanicOnFault(false), "Catch restores the goroutine's setting")
	}
}

func TestCatchReraisesOtherPanics(t *testing.T) {
	for _, c := range []struct {
		name string
		fn   func()
		want func(r any) bool
	}{
		{"a value", func() { panic("not a fault") }, func(r any) bool { return r == "not a fault" }},
		{"a nil dereference", func() {
			var p *byte
			sink = *p
		}, func(r any) bool {
			err, ok := r.(runtime.Error)
			return ok && strings.Contains(err.Error(), "nil pointer dereference")
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var r any
			func() {
				defer func() { r = recover() }()
				Catch(c.fn)
			}()
			require.True(t, c.want(r), "the panic reaches Catch's caller as it was: %v", r)
		})
	}
}

func TestDo(t *testing.T) {
	ps := os.Getpagesize()
	none, err := unix.Mmap(-1, 0, ps, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(t, err)
	defer unix.Munmap(none)

	err = Do(func() error { none[5] = 1; return nil })
	var fe *Error
	require.ErrorAs(t, err, &fe)
	require.Equal(t, addrOf(none)+5, fe.Addr)
	require.Contains(t, err.Error(), "memory fault at address 0x")

	want := errors.New("fn's own")
	require.Equal(t, want, Do(func() error { return want }))
	require.NoError(t, Do(func() error { return nil }))
}
