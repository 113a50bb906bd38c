//go:build amd64

package vmm

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// initramfs builds a newc cpio archive holding /init and a file of random
// (incompressible) bytes, so its size is what the kernel frees after it
// unpacked it.
func initramfs(t *testing.T, payload int) []byte {
	t.Helper()
	var b bytes.Buffer
	w := cpio.NewWriter(&b)
	add := func(name string, mode cpio.FileMode, data []byte) {
		require.NoError(t, w.WriteHeader(&cpio.Header{Name: name, Mode: mode, Size: int64(len(data))}))
		_, err := w.Write(data)
		require.NoError(t, err)
	}
	add("init", 0o755, []byte("#!/bin/sh\nexec /bin/sh\n"))
	blob := make([]byte, payload)
	_, err := rand.Read(blob)
	require.NoError(t, err)
	add("blob", 0o644, blob)
	require.NoError(t, w.Close())
	return b.Bytes()
}

// freed matches the line the kernel prints after unpacking its initramfs.
var freed = regexp.MustCompile(`Freeing initrd memory: (\d+)K`)

// TestDebianUnpacksInitramfsOnKVM boots Debian's kernel with an initramfs
// this test builds and waits for the kernel to free it: "Freeing initrd
// memory: NK" with N the initramfs's size in KiB (rounded up to pages),
// which proves the loader placed all of it where the kernel looked. Where
// KVM emulates every instruction this takes about 3 minutes (the host note
// measured 180 s), so it needs the emulator workarounds; it fails after 8.
func TestDebianUnpacksInitramfsOnKVM(t *testing.T) {
	testenv.KVM(t)
	path := debianVmlinux(t)
	noLeaks(t)
	kernel, err := os.Open(path)
	require.NoError(t, err)
	defer kernel.Close()
	rd := initramfs(t, 3<<20)
	layout := guestmem.Layout{{GPA: 0, Size: 192 * kMiB}}
	var console syncBuffer
	v, err := New(Config{Kernel: kernel, Initrd: bytes.NewReader(rd), InitrdSize: int64(len(rd)),
		Cmdline: DefaultCmdline + " " + EmulatorCmdline, Layout: layout, Console: &console,
		EmulatorWorkarounds: true})
	require.NoError(t, err)
	defer v.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	done := runAsync(ctx, v)
	waitForBoot(t, 8*time.Minute, "'Freeing initrd memory' on the serial console", done, &console, func() bool {
		return freed.Match(console.Bytes())
	})
	t.Logf("the kernel freed its initramfs after %v", time.Since(start).Round(time.Second))
	m := freed.FindSubmatch(console.Bytes())
	kib, err := strconv.Atoi(string(m[1]))
	require.NoError(t, err)
	require.Equal(t, (len(rd)+4095)/4096*4, kib, "the kernel freed exactly the initramfs it was given")
	cancel()
	<-done
}

// The initramfs the boot test hands the kernel is a well-formed newc
// archive with the entries it means (checked without KVM).
func TestInitramfsIsWellFormed(t *testing.T) {
	rd := initramfs(t, 12345)
	r := cpio.NewReader(bytes.NewReader(rd))
	var names []string
	var sizes []int64
	for {
		h, err := r.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
		sizes = append(sizes, h.Size)
	}
	require.Equal(t, []string{"init", "blob"}, names)
	require.Equal(t, int64(12345), sizes[1])
}

// TestDebianBzImageOnKVM boots Debian's vmlinuz, the bzImage, through the
// 64-bit boot protocol: its own LZ4 decompressor runs in the guest, which
// where KVM emulates every instruction takes about 2 minutes before the
// kernel prints its memory map (the host note measured `Memory:` at
// 132 s with QEMU). It is opt-in: GMEM_BOOT_BZIMAGE=1.
func TestDebianBzImageOnKVM(t *testing.T) {
	if os.Getenv("GMEM_BOOT_BZIMAGE") != "1" {
		t.Skip("opt-in: GMEM_BOOT_BZIMAGE=1 boots Debian's bzImage (minutes where KVM emulates every instruction)")
	}
	testenv.KVM(t)
	path := debianVmlinux(t)
	path = path[:len(path)-len("vmlinux")] + "vmlinuz"
	noLeaks(t)
	kernel, err := os.Open(path)
	require.NoError(t, err)
	defer kernel.Close()
	var console syncBuffer
	v, err := New(Config{Kernel: kernel, Cmdline: DefaultCmdline + " " + EmulatorCmdline,
		Layout: guestmem.Layout{{GPA: 0, Size: 256 * kMiB}}, Console: &console, EmulatorWorkarounds: true})
	require.NoError(t, err)
	defer v.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	done := runAsync(ctx, v)
	waitForBoot(t, 6*time.Minute, "memory map from the bzImage", done, &console, func() bool {
		return e820Printed(console.Bytes())
	})
	t.Logf("the bzImage printed its memory map after %v", time.Since(start).Round(time.Second))
	cancel()
	<-done
}
