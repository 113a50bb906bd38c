//go:build amd64

package boot_test

import (
	"bytes"
	"testing"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
)

// BenchmarkLoadBzImage loads a bzImage with an 8 MiB kernel and an 8 MiB
// initrd into 256 MiB of guest memory: the copies through guestmem and
// building boot_params, the GDT and the page tables.
func BenchmarkLoadBzImage(b *testing.B) {
	spec := defaultBz(nil)
	spec.pmSize = 8 * kMiB
	spec.initSize = 16 * kMiB
	img := spec.bytes()
	initrd := patternInitrd(8 * kMiB)
	mem, err := guestmem.New(guestmem.X86Layout(256 * kMiB))
	if err != nil {
		b.Fatal(err)
	}
	defer mem.Close()
	b.SetBytes(int64(len(img) + len(initrd)))
	for b.Loop() {
		if _, err := boot.LoadBzImage(mem, bytes.NewReader(img), boot.Options{
			Cmdline: "console=ttyS0", Initrd: bytes.NewReader(initrd), InitrdSize: int64(len(initrd)),
		}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoadDebianVmlinux loads Debian's 53 MB vmlinux through PVH, when
// .ci/fetch-kernel has fetched it.
func BenchmarkLoadDebianVmlinux(b *testing.B) {
	vmlinux := debianVmlinux(b)
	mem, err := guestmem.New(guestmem.X86Layout(128 * kMiB))
	if err != nil {
		b.Fatal(err)
	}
	defer mem.Close()
	b.SetBytes(int64(len(vmlinux)))
	for b.Loop() {
		if _, err := boot.LoadPVH(mem, bytes.NewReader(vmlinux), boot.Options{Cmdline: "console=ttyS0"}); err != nil {
			b.Fatal(err)
		}
	}
}
