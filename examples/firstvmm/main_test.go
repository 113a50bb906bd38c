//go:build amd64

package main

import (
	"bytes"
	"context"
	"errors"
	"go/build"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

// buildFirstVMM builds the example as a newcomer would (go build), into a
// temporary directory, and returns the binary. $GMEM_FIRSTVMM names one
// built beforehand instead, for a test machine without the Go toolchain.
func buildFirstVMM(t *testing.T) string {
	t.Helper()
	if exe := os.Getenv("GMEM_FIRSTVMM"); exe != "" {
		return exe
	}
	gotool, err := exec.LookPath("go")
	if err != nil {
		gotool = filepath.Join(build.Default.GOROOT, "bin", "go")
	}
	exe := filepath.Join(t.TempDir(), "firstvmm")
	out, err := exec.Command(gotool, "build", "-o", exe, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return exe
}

// runFirstVMM runs the binary with args for at most limit and returns its
// exit status and output.
func runFirstVMM(t *testing.T, exe string, limit time.Duration, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatalf("running firstvmm %v: %v", args, err)
	}
	require.NoError(t, ctx.Err(), "firstvmm ran past %v; stderr:\n%s", limit, errb.String())
	return code, out.String(), errb.String()
}

// TestFirstVMMUsage: without a kernel the example prints its flags and
// exits 2. It needs no KVM.
func TestFirstVMMUsage(t *testing.T) {
	exe := buildFirstVMM(t)
	code, stdout, stderr := runFirstVMM(t, exe, time.Minute)
	require.Equal(t, 2, code)
	require.Empty(t, stdout)
	for _, flag := range []string{"-kernel", "-initrd", "-append", "-size", "-for", "-emulator-workarounds"} {
		require.Contains(t, stderr, flag)
	}
	code, _, stderr = runFirstVMM(t, exe, time.Minute, "-kernel", filepath.Join(t.TempDir(), "none"))
	require.Equal(t, 1, code)
	require.Contains(t, stderr, "firstvmm: open ")
}

var e820Line = regexp.MustCompile(`BIOS-e820: \[mem 0x[0-9a-f]+-0x[0-9a-f]+\] (usable|reserved)`)

// TestFirstVMMBootsDebian runs the example on Debian's kernel (fetched by
// .ci/fetch-kernel) for 20 s, and 20 s more after the restore: the kernel
// prints its memory map on the console, and the example goes through every
// step and exits 0. Where KVM emulates every instruction the map comes
// about 15 s in; with hardware virtualization the kernel gets as far as
// looking for a root file system, panics and resets, which the example
// takes in its stride.
func TestFirstVMMBootsDebian(t *testing.T) {
	testenv.KVM(t)
	dir := os.Getenv("GMEM_KERNEL_DIR")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, ".cache", "gmem-kernel")
	}
	vmlinux := filepath.Join(dir, "vmlinux")
	if _, err := os.Stat(vmlinux); err != nil {
		testenv.Skip(t, "Debian's vmlinux is not fetched (%v): run .ci/fetch-kernel with lz4 installed", err)
	}
	exe := buildFirstVMM(t)
	start := time.Now()
	code, stdout, stderr := runFirstVMM(t, exe, 2*time.Minute,
		"-kernel", vmlinux, "-size", "128", "-for", "20s", "-emulator-workarounds")
	t.Logf("firstvmm ran for %v; stderr:\n%s", time.Since(start).Round(time.Millisecond), stderr)
	require.Equal(t, 0, code, "stdout:\n%s", stdout)
	require.GreaterOrEqual(t, len(e820Line.FindAllString(stdout, -1)), 3, "the kernel's memory map; stdout:\n%s", stdout)
	for _, step := range []string{"128 MiB guest, kernel at ", "stopped (", "saved ", "restored in ",
		"the restored guest ran on ("} {
		require.Contains(t, stderr, "firstvmm: "+step)
	}
	require.Contains(t, stderr, "(pvh)", "the PVH entry point, as boot.Protocol names it")
	require.Equal(t, 1, strings.Count(stdout, "Linux version"), "the restored kernel goes on; it does not boot again")
}
