//go:build amd64

package vmm

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

const (
	kMiB = 1 << 20
	kGiB = 1 << 30
)

// tinyKernel is an ELF "kernel" with a PVH note whose entry point, at 1 MiB,
// is code: 32-bit code, as PVH enters it, in protected mode with paging
// off. It is what boot.Load accepts as a vmlinux, small enough to build in a
// test, and real guest code on KVM.
func tinyKernel(code []byte) []byte {
	const (
		entry   = 0x100000
		phoff   = 64
		noteOff = phoff + 2*56
		codeOff = 0x1000
	)
	le := binary.LittleEndian
	note := le.AppendUint32(nil, 4)     // namesz
	note = le.AppendUint32(note, 4)     // descsz
	note = le.AppendUint32(note, 18)    // XEN_ELFNOTE_PHYS32_ENTRY
	note = append(note, "Xen\x00"...)   // name
	note = le.AppendUint32(note, entry) // desc: the entry point
	f := make([]byte, codeOff+len(code))
	copy(f, "\x7fELF\x02\x01\x01") // ELFCLASS64, ELFDATA2LSB, EV_CURRENT
	le.PutUint16(f[16:], 2)        // ET_EXEC
	le.PutUint16(f[18:], 62)       // EM_X86_64
	le.PutUint32(f[20:], 1)        // e_version
	le.PutUint64(f[24:], entry)    // e_entry
	le.PutUint64(f[32:], phoff)    // e_phoff
	le.PutUint16(f[52:], 64)       // e_ehsize
	le.PutUint16(f[54:], 56)       // e_phentsize
	le.PutUint16(f[56:], 2)        // e_phnum
	prog := func(i int, typ, flags uint32, off, paddr, size, align uint64) {
		p := f[phoff+56*i:]
		le.PutUint32(p, typ)
		le.PutUint32(p[4:], flags)
		le.PutUint64(p[8:], off)
		le.PutUint64(p[16:], paddr) // p_vaddr
		le.PutUint64(p[24:], paddr) // p_paddr
		le.PutUint64(p[32:], size)  // p_filesz
		le.PutUint64(p[40:], size)  // p_memsz
		le.PutUint64(p[48:], align)
	}
	prog(0, 1, 5, codeOff, entry, uint64(len(code)), 0x1000) // PT_LOAD, R+X
	prog(1, 4, 4, noteOff, 0, uint64(len(note)), 4)          // PT_NOTE
	copy(f[noteOff:], note)
	copy(f[codeOff:], code)
	return f
}

// 32-bit guest programs for tinyKernel.
var (
	// helloAndReset writes "hi" to COM1, then COM1's line status and what
	// port 0x70 (no device) reads, then asks for a reset.
	helloAndReset = []byte{
		0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
		0xb0, 'h', 0xee, // mov al, 'h'; out dx, al
		0xb0, 'i', 0xee, // mov al, 'i'; out dx, al
		0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (LSR)
		0xec,                   // in al, dx
		0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
		0xee,       // out dx, al
		0xe4, 0x70, // in al, 0x70
		0xee,       // out dx, al
		0xb0, 0xfe, // mov al, 0xfe
		0xe6, 0x64, // out 0x64, al: reset
		0xf4, // hlt
	}
	// counter writes 0, 1, 2, ... 255, 0, 1, ... to COM1 for ever.
	counter = []byte{
		0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
		0x31, 0xc0, // xor eax, eax
		0xee,       // loop: out dx, al
		0xfe, 0xc0, // inc al
		0xeb, 0xfb, // jmp loop
	}
	// int3Then writes 'a', runs int3 with no IDT (a shutdown, where KVM
	// can run it), then would write 'b'.
	int3Then = []byte{
		0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
		0xb0, 'a', 0xee, // mov al, 'a'; out dx, al
		0xcc,            // int3
		0xb0, 'b', 0xee, // mov al, 'b'; out dx, al
		0xf4, // hlt
	}
)

// syncBuffer is a bytes.Buffer for a console that the test reads while Run
// writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

// noLeaks checks at cleanup that t left no descriptor and no guest mapping
// behind.
func noLeaks(t *testing.T) {
	t.Helper()
	fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
	t.Cleanup(func() {
		if t.Failed() {
			return
		}
		if n := testenv.OpenFDs(t); n != fds {
			t.Errorf("%d open descriptors after the test, %d before", n, fds)
		}
		if n := testenv.GuestMappings(t); n != maps {
			t.Errorf("%d guest mappings after the test, %d before", n, maps)
		}
	})
}

// debianVmlinux returns the path of Debian's vmlinux as .ci/fetch-kernel
// leaves it (in $GMEM_KERNEL_DIR or ~/.cache/gmem-kernel), or skips t (fails
// it under GMEM_REQUIRE_KVM=1, where .ci/run has fetched it).
func debianVmlinux(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("GMEM_KERNEL_DIR")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			testenv.Skip(t, "no home directory for ~/.cache/gmem-kernel: %v", err)
		}
		dir = filepath.Join(home, ".cache", "gmem-kernel")
	}
	p := filepath.Join(dir, "vmlinux")
	if _, err := os.Stat(p); err != nil {
		testenv.Skip(t, "Debian's vmlinux is not fetched (%v): run .ci/fetch-kernel with lz4 installed", err)
	}
	return p
}
