//go:build amd64

package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/vmm"
)

// tinyVmlinux writes an ELF kernel with a PVH note whose code, at 1 MiB, is
// hlt: a file gmem boot accepts as a vmlinux.
func tinyVmlinux(t *testing.T) string {
	t.Helper()
	le := binary.LittleEndian
	f := make([]byte, 0x1001)
	copy(f, "\x7fELF\x02\x01\x01")
	le.PutUint16(f[16:], 2)           // ET_EXEC
	le.PutUint16(f[18:], 62)          // EM_X86_64
	le.PutUint32(f[20:], 1)           // EV_CURRENT
	le.PutUint64(f[24:], 0x100000)    // e_entry
	le.PutUint64(f[32:], 64)          // e_phoff
	le.PutUint16(f[52:], 64)          // e_ehsize
	le.PutUint16(f[54:], 56)          // e_phentsize
	le.PutUint16(f[56:], 2)           // e_phnum
	load, note := f[64:], f[120:]     // the two program headers
	le.PutUint32(load, 1)             // PT_LOAD
	le.PutUint64(load[8:], 0x1000)    // p_offset
	le.PutUint64(load[16:], 0x100000) // p_vaddr
	le.PutUint64(load[24:], 0x100000) // p_paddr
	le.PutUint64(load[32:], 1)        // p_filesz
	le.PutUint64(load[40:], 1)        // p_memsz
	le.PutUint32(note, 4)             // PT_NOTE
	le.PutUint64(note[8:], 176)       // p_offset: the note below
	le.PutUint64(note[32:], 20)       // p_filesz
	n := f[176:]
	le.PutUint32(n, 4)      // namesz
	le.PutUint32(n[4:], 4)  // descsz
	le.PutUint32(n[8:], 18) // XEN_ELFNOTE_PHYS32_ENTRY
	copy(n[12:], "Xen\x00")
	le.PutUint32(n[16:], 0x100000)
	f[0x1000] = 0xf4 // hlt
	p := filepath.Join(t.TempDir(), "vmlinux")
	require.NoError(t, os.WriteFile(p, f, 0o644))
	return p
}

// TestBootBadCommandLinesExit2: every wrong gmem boot command line exits 2
// with one line naming the flag, before KVM is looked at.
func TestBootBadCommandLinesExit2(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk")
	require.NoError(t, os.WriteFile(junk, bytes.Repeat([]byte("not a kernel "), 100), 0o644))
	badELF := filepath.Join(dir, "bad.elf")
	require.NoError(t, os.WriteFile(badELF, []byte("\x7fELF\x01\x01\x01"+strings.Repeat("\x00", 60)), 0o644))
	empty := filepath.Join(dir, "empty")
	require.NoError(t, os.WriteFile(empty, nil, 0o644))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"boot"}, "missing flags: --kernel=FILE"},
		{[]string{"boot", "--kernel", junk, "--turbo"}, "unknown flag --turbo"},
		{[]string{"boot", "--kernel", junk, "--size", "3M"}, "boot: --size 3MiB: must be a positive multiple of 2 MiB"},
		{[]string{"boot", "--kernel", junk, "--size", "0"}, "--size 0B: must be a positive multiple of 2 MiB"},
		{[]string{"boot", "--kernel", junk, "--size", "4GB"}, "write G or GiB"},
		{[]string{"boot", "--kernel", junk, "--append", strings.Repeat("x", 70000)}, "boot: --append: 70000 bytes, more than the 65535"},
		{[]string{"boot", "--kernel", junk, "--initrd", filepath.Join(dir, "none")}, "boot: --initrd: stat "},
		{[]string{"boot", "--kernel", junk, "--initrd", empty}, "--initrd " + empty + ": empty"},
		{[]string{"boot", "--kernel", junk, "--initrd", dir}, "not a regular file"},
		{[]string{"boot", "--kernel", filepath.Join(dir, "none")}, "boot: --kernel " + filepath.Join(dir, "none") + ": open "},
		{[]string{"boot", "--kernel", junk}, "neither a vmlinux (ELF) nor a bzImage: boot: bzImage:"},
		{[]string{"boot", "--kernel", badELF}, "boot: vmlinux: "},
	} {
		name := strings.ReplaceAll(strings.Join(tc.args, " "), dir, "DIR")
		t.Run(name[:min(60, len(name))], func(t *testing.T) {
			code, stdout, stderr := gmemProcess(t, exe, nil, tc.args...)
			require.Equal(t, exitUsage, code, "stderr %q", stderr)
			require.Empty(t, stdout)
			require.True(t, strings.HasPrefix(stderr, "gmem: error: "), "stderr %q", stderr)
			require.Equal(t, 1, strings.Count(stderr, "\n"), "stderr %q is not one line", stderr)
			require.Contains(t, stderr, tc.want)
			require.True(t, strings.HasSuffix(stderr, "(see gmem boot --help)\n"), "stderr %q", stderr)
		})
	}
}

// TestBootDefaults: --append's default is vmm.DefaultCmdline, and
// --emulator-workarounds adds vmm.EmulatorCmdline and the workarounds.
func TestBootDefaults(t *testing.T) {
	f, _ := reflect.TypeOf(BootCmd{}).FieldByName("Append")
	require.Equal(t, vmm.DefaultCmdline, f.Tag.Get("default"))
	c := BootCmd{Append: vmm.DefaultCmdline, Size: 64 * MiB, EmulatorWorkarounds: true}
	cfg := c.config()
	require.Equal(t, vmm.DefaultCmdline+" "+vmm.EmulatorCmdline, cfg.Cmdline)
	require.True(t, cfg.EmulatorWorkarounds)
	require.Equal(t, uint64(64<<20), cfg.Size)
	c.EmulatorWorkarounds = false
	require.Equal(t, vmm.DefaultCmdline, c.config().Cmdline)
}

// TestBootWithoutKVM: with no KVM device gmem boot says so in one line and
// exits 1, having allocated nothing.
func TestBootWithoutKVM(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	code, stdout, stderr := gmemProcess(t, exe, nil, "boot", "--kernel", tinyVmlinux(t), "--kvm",
		filepath.Join(t.TempDir(), "kvm"))
	require.Equal(t, exitError, code, "stderr %q", stderr)
	require.Empty(t, stdout)
	require.Equal(t, 1, strings.Count(stderr, "\n"), "stderr %q", stderr)
	require.Contains(t, stderr, "gmem: error: gmem boot needs KVM: kvm: device not available")
}

// consoleBuffer is the stdout gmem boot writes the console to while the
// test reads it.
type consoleBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (c *consoleBuffer) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.Write(p)
}

func (c *consoleBuffer) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.String()
}

// TestBootDebianOnKVM runs gmem boot on Debian's kernel (fetched by
// .ci/fetch-kernel) in-process until its memory map is on the console, then
// stops it as Ctrl-C does: it exits 130 and leaves no descriptor or guest
// mapping behind. Where KVM emulates every instruction the map comes about
// 15 s in.
func TestBootDebianOnKVM(t *testing.T) {
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
	fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr consoleBuffer
	code := make(chan int, 1)
	start := time.Now()
	go func() {
		code <- run(ctx, []string{"boot", "--kernel", vmlinux, "--size", "128M", "--emulator-workarounds"}, &stdout, &stderr,
			os.DirFS("/"))
	}()
	deadline := time.After(time.Minute)
	for !strings.Contains(stdout.String(), "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable") {
		select {
		case c := <-code:
			t.Fatalf("gmem boot exited %d early; stderr %q; stdout:\n%s", c, stderr.String(), stdout.String())
		case <-deadline:
			t.Fatalf("no memory map after a minute; stdout:\n%s", stdout.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Logf("the memory map after %v", time.Since(start).Round(time.Millisecond))
	cancel() // Ctrl-C
	require.Equal(t, exitInterrupted, <-code)
	require.Contains(t, stderr.String(), "gmem boot: 128MiB guest, kernel at ")
	require.Contains(t, stderr.String(), "gmem: interrupted after ")
	require.Contains(t, stderr.String(), "the guest is stopped and released")
	require.Equal(t, fds, testenv.OpenFDs(t), "open descriptors")
	require.Equal(t, maps, testenv.GuestMappings(t), "guest mappings")
}
