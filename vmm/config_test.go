//go:build amd64

package vmm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
)

// TestConfigValidate: every refusal is a *ConfigError naming the field,
// matching ErrConfig (and its cause where there is one), made before
// anything is allocated.
func TestConfigValidate(t *testing.T) {
	k := bytes.NewReader(tinyKernel(helloAndReset))
	for _, tc := range []struct {
		name  string
		cfg   Config
		field string
		want  string
		cause error
	}{
		{"no kernel", Config{}, "Kernel", "nil: New needs a kernel image", nil},
		{"initrd without size", Config{Kernel: k, Initrd: k}, "InitrdSize", "0: an Initrd needs its size", nil},
		{"negative initrd size", Config{Kernel: k, Initrd: k, InitrdSize: -1}, "InitrdSize", "-1: an Initrd needs", nil},
		{"size without initrd", Config{Kernel: k, InitrdSize: 10}, "InitrdSize", "10 without an Initrd", nil},
		{"NUL in cmdline", Config{Kernel: k, Cmdline: "console=ttyS0\x00x"}, "Cmdline", "a NUL byte at offset 13", nil},
		{"long cmdline", Config{Kernel: k, Cmdline: strings.Repeat("x", boot.CmdlineMax)}, "Cmdline",
			"65536 bytes, more than the 65535", nil},
		{"size and layout", Config{Kernel: k, Size: 64 * kMiB, Layout: guestmem.X86Layout(64 * kMiB)}, "Size",
			"set together with Layout", nil},
		{"unaligned size", Config{Kernel: k, Size: 3 * kMiB}, "Size", "3145728 bytes: not a multiple of 2 MiB", nil},
		{"huge size", Config{Kernel: k, Size: 1 << 62}, "Size", "4611686018427387904 bytes: too large for the guest address space",
			guestmem.ErrOverflow},
		{"overlapping layout", Config{Kernel: k, Layout: guestmem.Layout{{GPA: 0, Size: 2 * kMiB}, {GPA: kMiB, Size: 2 * kMiB}}},
			"Layout", "not a valid layout", guestmem.ErrOverlap},
		{"RAM in the PCI hole", Config{Kernel: k, Layout: guestmem.Layout{{GPA: 0, Size: 4 * kGiB}}}, "Layout",
			"not bootable", boot.ErrLayout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			var ce *ConfigError
			require.ErrorAs(t, err, &ce)
			require.Equal(t, tc.field, ce.Field)
			require.ErrorIs(t, err, ErrConfig)
			require.Contains(t, err.Error(), "vmm: Config."+tc.field+": "+tc.want)
			if tc.cause != nil {
				require.ErrorIs(t, err, tc.cause)
			}
			_, err = New(tc.cfg)
			require.ErrorAs(t, err, &ce, "New refuses it the same way")
		})
	}
	for _, ok := range []Config{
		{Kernel: k},
		{Kernel: k, Size: 2 * kMiB, Cmdline: DefaultCmdline + " " + EmulatorCmdline},
		{Kernel: k, Initrd: k, InitrdSize: 5, Layout: guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 4 * kGiB, Size: 2 * kMiB}}},
	} {
		require.NoError(t, ok.Validate())
	}
	l, err := Config{Kernel: k}.layout(true)
	require.NoError(t, err)
	require.Equal(t, guestmem.X86Layout(DefaultSize), l)
	l, err = Config{Kernel: k, Size: 5 * kGiB}.layout(true)
	require.NoError(t, err)
	require.Equal(t, guestmem.Layout{{GPA: 0, Size: 3 * kGiB}, {GPA: 4 * kGiB, Size: 2 * kGiB}}, l)
}

// TestRestoreConfig: Restore refuses what only New can use, before reading
// the snapshot.
func TestRestoreConfig(t *testing.T) {
	k := bytes.NewReader(tinyKernel(helloAndReset))
	for _, tc := range []struct {
		cfg   Config
		field string
	}{
		{Config{Kernel: k}, "Kernel"},
		{Config{Initrd: k}, "Initrd"},
		{Config{InitrdSize: 4}, "InitrdSize"},
		{Config{Cmdline: "console=ttyS0"}, "Cmdline"},
		{Config{Size: 3 * kMiB}, "Size"},
	} {
		r := &countingReader{}
		_, err := Restore(context.Background(), r, tc.cfg)
		var ce *ConfigError
		require.ErrorAs(t, err, &ce)
		require.Equal(t, tc.field, ce.Field)
		require.Zero(t, r.n, "nothing is read")
	}
	require.NoError(t, Config{}.validateRestore())
	require.NoError(t, Config{Size: 64 * kMiB, Console: io.Discard, EmulatorWorkarounds: true}.validateRestore())
}

type countingReader struct{ n int }

func (r *countingReader) Read(p []byte) (int, error) {
	r.n += len(p)
	return 0, errors.New("read")
}

// TestDefaultCmdlines: the defaults are the command line the boot package's
// Debian test boots with, split into what every host needs and what the
// emulator needs.
func TestDefaultCmdlines(t *testing.T) {
	require.Equal(t, "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 nokaslr noxsave mitigations=off "+
		"cryptomgr.notests tsc=reliable nosoftlockup "+
		"clearcpuid=erms,fsrm,ssse3,sse4_1,sse4_2,pclmulqdq,aes,smap,popcnt "+
		"initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,event_trace_init,tracer_init_tracefs",
		DefaultCmdline+" "+EmulatorCmdline)
}
