//go:build amd64

package boot_test

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bobuhiro11/gokvm/bootparam"
	"github.com/bobuhiro11/gokvm/pvh"
	"github.com/pierrec/lz4/v4"
	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// Debian's kernel, as .ci/fetch-kernel leaves it: vmlinuz (the bzImage of
// the linux-image-cloud-amd64 package) and, when the lz4 tool was there to
// unpack it, vmlinux, in $GMEM_KERNEL_DIR or ~/.cache/gmem-kernel. Tests
// that need it skip, saying so, when it is absent: it is a download, not
// part of the repository, and CI may not have fetched it.

// kernelDir is the directory .ci/fetch-kernel fills.
func kernelDir() string {
	if d := os.Getenv("GMEM_KERNEL_DIR"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "gmem-kernel")
	}
	return filepath.Join(home, ".cache", "gmem-kernel")
}

// debianVmlinuz returns Debian's bzImage, or skips t.
func debianVmlinuz(t testing.TB) []byte {
	t.Helper()
	p := filepath.Join(kernelDir(), "vmlinuz")
	b, err := os.ReadFile(p)
	if err != nil {
		// .ci/run fetches it: under GMEM_REQUIRE_KVM=1 its absence fails.
		testenv.Skip(t, "Debian's kernel is not fetched (%v): run .ci/fetch-kernel", err)
	}
	return b
}

var vmlinuxOnce struct {
	sync.Once
	b   []byte
	err error
}

// debianVmlinux returns Debian's vmlinux: the one .ci/fetch-kernel
// unpacked, or else vmlinuz's payload unpacked here (once per test run). It
// skips t without vmlinuz.
func debianVmlinux(t testing.TB) []byte {
	t.Helper()
	if b, err := os.ReadFile(filepath.Join(kernelDir(), "vmlinux")); err == nil {
		return b
	}
	bz := debianVmlinuz(t)
	vmlinuxOnce.Do(func() {
		start := time.Now()
		vmlinuxOnce.b, vmlinuxOnce.err = unpackVmlinux(bz)
		t.Logf("unpacked vmlinux (%d bytes) from vmlinuz in %v", len(vmlinuxOnce.b), time.Since(start))
	})
	require.NoError(t, vmlinuxOnce.err)
	return vmlinuxOnce.b
}

// unpackVmlinux extracts the vmlinux ELF from a bzImage whose payload is
// LZ4-compressed, as Debian's is: the payload (payload_offset and
// payload_length, from the start of the protected-mode kernel) is an LZ4
// legacy stream (magic 02 21 4c 18) followed by the uncompressed size, 32
// bits little-endian, that the kernel's build appends.
func unpackVmlinux(bz []byte) ([]byte, error) {
	le := binary.LittleEndian
	sects := int(bz[0x1f1])
	if sects == 0 {
		sects = 4
	}
	off := (sects+1)*512 + int(le.Uint32(bz[0x248:]))
	n := int(le.Uint32(bz[0x24c:]))
	if off+n > len(bz) || n < 8 {
		return nil, fmt.Errorf("payload [%#x, +%#x) outside the %d-byte file", off, n, len(bz))
	}
	p := bz[off : off+n]
	if !bytes.Equal(p[:4], []byte{0x02, 0x21, 0x4c, 0x18}) {
		return nil, fmt.Errorf("payload starts % x: not an LZ4 legacy stream", p[:4])
	}
	size := le.Uint32(p[n-4:])
	out, err := io.ReadAll(lz4.NewReader(bytes.NewReader(p[:n-4])))
	if err != nil {
		return nil, fmt.Errorf("unpacking the LZ4 payload: %w", err)
	}
	if uint32(len(out)) != size {
		return nil, fmt.Errorf("unpacked %d bytes, the payload says %d", len(out), size)
	}
	return out, nil
}

// TestDebianBzImage parses Debian's vmlinuz, checks its header against
// gokvm's decoding, and loads it: the protected-mode kernel (syssize × 16
// bytes, without the signature after it) at pref_address, the initrd by the
// rules, boot_params' header fields.
func TestDebianBzImage(t *testing.T) {
	bz := debianVmlinuz(t)
	b, err := boot.ParseBzImage(bytes.NewReader(bz))
	require.NoError(t, err)
	bp, err := bootparam.New(bytes.NewReader(bz))
	require.NoError(t, err)
	compareHeader(t, b, bp)
	h := b.Header
	t.Logf("protocol %#x, setup %d bytes, kernel %#x bytes (+%d bytes after it), pref_address %#x, kernel_alignment %#x, init_size %#x, cmdline_size %d, initrd_addr_max %#x, xloadflags %#x",
		h.Version, b.SetupSize, b.KernelSize, int64(len(bz))-b.SetupSize-int64(b.KernelSize), h.PrefAddress, h.KernelAlignment, h.InitSize, h.CmdlineSize, h.InitrdAddrMax, h.XLoadFlags)
	require.GreaterOrEqual(t, h.Version, uint16(0x020c))
	require.NotZero(t, h.XLoadFlags&1, "XLF_KERNEL_64")
	require.True(t, h.Relocatable)
	require.LessOrEqual(t, b.SetupSize+int64(b.KernelSize), int64(len(bz)))

	layout := guestmem.X86Layout(256 * kMiB)
	mem := newMem(t, layout)
	initrd := patternInitrd(1*kMiB + 5)
	e, err := boot.LoadBzImage(mem, bytes.NewReader(bz), boot.Options{Cmdline: "console=ttyS0", Initrd: bytes.NewReader(initrd), InitrdSize: int64(len(initrd))})
	require.NoError(t, err)
	require.Equal(t, guestmem.GuestAddress(h.PrefAddress), e.Kernel.GPA)
	require.Equal(t, uint64(h.PrefAddress)+0x200, e.Regs.RIP)
	require.Equal(t, sha256.Sum256(bz[b.SetupSize:b.SetupSize+int64(b.KernelSize)]), sha256.Sum256(read(t, mem, e.Kernel.GPA, e.Kernel.Size)))
	checkInitrdRules(t, e, uint64(h.InitrdAddrMax))
	require.Equal(t, guestmem.Span{GPA: (256*kMiB - guestmem.GuestAddress(len(initrd))) &^ 0xfff, Size: uint64(len(initrd))}, e.Initrd)
	zp := read(t, mem, boot.ZeroPageAddr, 4096)
	end := 0x202 + int(bz[0x201])
	for i := 0x1f1; i < end; i++ {
		switch {
		case i == 0x210, i >= 0x214 && i < 0x220, i >= 0x228 && i < 0x22c:
			continue // set by the loader
		}
		require.Equalf(t, bz[i], zp[i], "boot_params byte %#x", i)
	}
}

// TestDebianVmlinuxPVHNote parses the PVH note of Debian's vmlinux: the
// entry matches what gokvm's parser (Firecracker's algorithm) reads from
// the same note and the pvh_start_xen symbol where the file has symbols,
// and lies in the text segment; the segments load at their physical
// addresses.
func TestDebianVmlinuxPVHNote(t *testing.T) {
	vmlinux := debianVmlinux(t)
	v, err := boot.ParseVmlinux(bytes.NewReader(vmlinux))
	require.NoError(t, err)
	t.Logf("PVH entry %#x (note descriptor at file offset %#x), %d segments, extent [%v, +%#x)",
		v.PVHEntry, v.NoteOffset, len(v.Segments), v.Extent().GPA, v.Extent().Size)

	f, err := elf.NewFile(bytes.NewReader(vmlinux))
	require.NoError(t, err)
	var fromGokvm []uint32
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		if e, err := pvh.ParsePVHEntry(bytes.NewReader(vmlinux), p); err == nil {
			fromGokvm = append(fromGokvm, e)
		}
	}
	require.Equal(t, []uint32{v.PVHEntry}, fromGokvm)
	if syms, err := f.Symbols(); err == nil {
		for _, s := range syms {
			if s.Name == "pvh_start_xen" {
				require.Equal(t, s.Value-0xffffffff80000000, uint64(v.PVHEntry), "pvh_start_xen's physical address")
			}
		}
	}
	text := v.Segments[0]
	require.True(t, uint64(v.PVHEntry) >= uint64(text.GPA) && uint64(v.PVHEntry) < uint64(text.GPA)+text.FileSize)

	layout := guestmem.X86Layout(128 * kMiB)
	mem := newMem(t, layout)
	e, err := boot.LoadPVH(mem, bytes.NewReader(vmlinux), boot.Options{Cmdline: "console=ttyS0"})
	require.NoError(t, err)
	require.Equal(t, uint64(v.PVHEntry), e.Regs.RIP)
	for i, s := range v.Segments {
		got := read(t, mem, s.GPA, s.FileSize)
		require.Equalf(t, sha256.Sum256(vmlinux[s.Offset:s.Offset+int64(s.FileSize)]), sha256.Sum256(got), "segment %d", i)
	}
}

// TestUnpackVmlinuxMatchesLZ4Tool checks this test's LZ4 unpacking against
// the vmlinux .ci/fetch-kernel made with the lz4 tool, when it made one.
func TestUnpackVmlinuxMatchesLZ4Tool(t *testing.T) {
	tool, err := os.ReadFile(filepath.Join(kernelDir(), "vmlinux"))
	if err != nil {
		testenv.Skip(t, "no vmlinux from the lz4 tool (%v): run .ci/fetch-kernel on a host with lz4", err)
	}
	ours, err := unpackVmlinux(debianVmlinuz(t))
	require.NoError(t, err)
	require.Equal(t, sha256.Sum256(tool), sha256.Sum256(ours))
}
