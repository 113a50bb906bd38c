//go:build amd64

package boot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Offsets of the setup header in a bzImage, which are also its offsets in
// boot_params (Documentation/arch/x86/boot.rst, "The real-mode kernel
// header"), and the other boot_params fields the loader writes
// (arch/x86/include/uapi/asm/bootparam.h).
const (
	offSetupSects    = 0x1f1
	offSysSize       = 0x1f4
	offJump          = 0x200 // jmp short: its second byte is the header's length past 0x202
	offHeader        = 0x202 // "HdrS"
	offVersion       = 0x206
	offTypeOfLoader  = 0x210
	offLoadFlags     = 0x211
	offCode32Start   = 0x214
	offRamdiskImage  = 0x218
	offRamdiskSize   = 0x21c
	offCmdLinePtr    = 0x228
	offInitrdAddrMax = 0x22c
	offKernelAlign   = 0x230
	offRelocatable   = 0x234
	offMinAlignment  = 0x235
	offXLoadFlags    = 0x236
	offCmdlineSize   = 0x238
	offPrefAddress   = 0x258
	offInitSize      = 0x260
	hdrEnd212        = 0x264 // the header of protocol 2.12 ends here (after init_size)
	hdrMax           = 0x290 // boot_params' copy of the header ends here (edd_mbr_sig_buffer follows)

	offE820Entries = 0x1e8
	offSentinel    = 0x1ef
	offE820Table   = 0x2d0
	e820EntrySize  = 20
	zeroPageSize   = 4096
)

// Setup header values.
const (
	hdrMagic       = 0x53726448 // "HdrS"
	loadedHigh     = 1 << 0     // loadflags: protected-mode code at 0x100000 (a bzImage)
	xlfKernel64    = 1 << 0     // xloadflags: the 64-bit entry at +0x200 exists
	loaderUnknown  = 0xff       // type_of_loader: a loader without an assigned ID
	entry64Offset  = 0x200      // the 64-bit entry point, from the start of the protected-mode kernel
	defaultLoadAdr = guestmem.GuestAddress(0x100000)

	minVersion      = 0x0206
	xloadVersion    = 0x020c // 2.12: xloadflags, and so XLF_KERNEL_64
	prefAddrVersion = 0x020a // 2.10: pref_address, init_size, min_alignment
)

// SetupHeader is the part of a bzImage's setup header (at 0x1f1) that the
// loader reads.
type SetupHeader struct {
	SetupSects      uint8  // 512-byte sectors of real-mode setup after the boot sector (0 means 4)
	SysSize         uint32 // size of the protected-mode kernel, in 16-byte paragraphs
	Version         uint16 // boot protocol version, 0x020f for 2.15
	LoadFlags       uint8  // LOADED_HIGH (bit 0) is required
	Code32Start     uint32 // the default load address of the protected-mode kernel
	InitrdAddrMax   uint32 // the highest address the initrd may occupy
	KernelAlignment uint32 // alignment a relocatable kernel needs
	Relocatable     bool   // relocatable_kernel
	MinAlignment    uint8  // log2 of the minimum alignment (2.10+)
	XLoadFlags      uint16 // XLF_KERNEL_64 (bit 0) is required
	CmdlineSize     uint32 // the longest command line, without its NUL
	PrefAddress     uint64 // preferred load address (2.10+)
	InitSize        uint32 // memory the kernel needs from its runtime start before it reads the memory map
}

// BzImage is a parsed and checked bzImage: its header, and where its parts
// are in the file and go in guest memory.
type BzImage struct {
	Header SetupHeader // the header's fields, as read
	// SetupSize is the size of the real-mode part before the
	// protected-mode kernel: (setup_sects+1) × 512.
	SetupSize int64
	// KernelSize is the size of the protected-mode kernel, syssize × 16.
	// Bytes after it (a signature) are not loaded.
	KernelSize uint64
	// LoadAddr is where the protected-mode kernel is loaded: pref_address,
	// or 1 MiB when the header has none.
	LoadAddr guestmem.GuestAddress
	// RuntimeStart is where the kernel will run from, the start of the
	// InitSize bytes it needs: LoadAddr rounded up to kernel_alignment for
	// a relocatable kernel, LoadAddr itself for one that is not.
	RuntimeStart guestmem.GuestAddress
	// Entry64 is the 64-bit entry point, LoadAddr + 0x200.
	Entry64 guestmem.GuestAddress

	hdr []byte // the header bytes [0x1f1, end), copied into boot_params
}

// Extent returns the guest memory the kernel needs before it reads its
// memory map: its image and its InitSize bytes from RuntimeStart.
func (b *BzImage) Extent() guestmem.Span {
	lo := min(b.LoadAddr, b.RuntimeStart)
	hi := max(b.LoadAddr+guestmem.GuestAddress(b.KernelSize), b.RuntimeStart+guestmem.GuestAddress(b.Header.InitSize))
	return guestmem.Span{GPA: lo, Size: uint64(hi - lo)}
}

// ParseBzImage reads and checks a bzImage's setup header: the "HdrS" magic,
// protocol 2.06 or later, LOADED_HIGH, XLF_KERNEL_64 (protocol 2.12 or
// later), a non-zero syssize and init_size, a power-of-two
// kernel_alignment for a relocatable kernel, and a file long enough for
// the protected-mode kernel. It reads nothing else.
func ParseBzImage(r io.ReaderAt) (*BzImage, error) {
	const img = "bzImage"
	buf := make([]byte, hdrMax)
	n, err := r.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, imageErr(img, 0, err, "reading the setup header")
	}
	buf = buf[:n]
	if n < offVersion {
		return nil, imageErr(img, offHeader, ErrBadMagic, "%d-byte file has no setup header", n)
	}
	le := binary.LittleEndian
	if m := le.Uint32(buf[offHeader:]); m != hdrMagic {
		return nil, imageErr(img, offHeader, ErrBadMagic, "header magic %#08x, want %#08x (\"HdrS\")", m, hdrMagic)
	}
	if n < offVersion+2 {
		return nil, imageErr(img, offVersion, ErrTruncated, "setup header")
	}
	h := SetupHeader{Version: le.Uint16(buf[offVersion:])}
	if h.Version < minVersion {
		return nil, imageErr(img, offVersion, ErrProtocolVersion, "setup header version %#04x", h.Version)
	}
	end := offHeader + int(buf[offJump+1])
	if end < hdrEnd212 && h.Version >= xloadVersion {
		return nil, imageErr(img, offJump+1, ErrBadHeader, "setup header of protocol %#04x ends at %#x, before init_size", h.Version, end)
	}
	end = min(max(end, hdrEnd212), hdrMax)
	if n < end {
		return nil, imageErr(img, int64(n), ErrTruncated, "setup header to %#x", end)
	}
	h.SetupSects = buf[offSetupSects]
	h.SysSize = le.Uint32(buf[offSysSize:])
	h.LoadFlags = buf[offLoadFlags]
	h.Code32Start = le.Uint32(buf[offCode32Start:])
	h.InitrdAddrMax = le.Uint32(buf[offInitrdAddrMax:])
	h.KernelAlignment = le.Uint32(buf[offKernelAlign:])
	h.Relocatable = buf[offRelocatable] != 0
	h.CmdlineSize = le.Uint32(buf[offCmdlineSize:])
	if h.Version >= prefAddrVersion {
		h.MinAlignment = buf[offMinAlignment]
		h.PrefAddress = le.Uint64(buf[offPrefAddress:])
		h.InitSize = le.Uint32(buf[offInitSize:])
	}
	if h.Version >= xloadVersion {
		h.XLoadFlags = le.Uint16(buf[offXLoadFlags:])
	}
	switch {
	case h.LoadFlags&loadedHigh == 0:
		return nil, imageErr(img, offLoadFlags, ErrBadHeader, "loadflags %#02x without LOADED_HIGH (a zImage)", h.LoadFlags)
	case h.Version < xloadVersion:
		return nil, imageErr(img, offVersion, ErrNot64Bit, "protocol %#04x predates xloadflags (2.12)", h.Version)
	case h.XLoadFlags&xlfKernel64 == 0:
		return nil, imageErr(img, offXLoadFlags, ErrNot64Bit, "xloadflags %#04x without XLF_KERNEL_64", h.XLoadFlags)
	case h.SysSize == 0:
		return nil, imageErr(img, offSysSize, ErrBadHeader, "syssize 0")
	case h.InitSize == 0:
		return nil, imageErr(img, offInitSize, ErrBadHeader, "init_size 0")
	case h.Relocatable && (h.KernelAlignment == 0 || h.KernelAlignment&(h.KernelAlignment-1) != 0):
		return nil, imageErr(img, offKernelAlign, ErrBadHeader, "kernel_alignment %#x is not a power of two", h.KernelAlignment)
	case h.PrefAddress >= 1<<32-uint64(h.InitSize):
		// code32_start and the identity map are 32-bit matters.
		return nil, imageErr(img, offPrefAddress, ErrBadHeader, "pref_address %#x: the kernel must end below 4 GiB", h.PrefAddress)
	}
	b := &BzImage{Header: h, hdr: append([]byte(nil), buf[offSetupSects:end]...)}
	sects := int64(h.SetupSects)
	if sects == 0 {
		sects = 4
	}
	b.SetupSize = (sects + 1) * 512
	b.KernelSize = uint64(h.SysSize) * 16
	b.LoadAddr = defaultLoadAdr
	if h.PrefAddress != 0 {
		b.LoadAddr = guestmem.GuestAddress(h.PrefAddress)
	}
	b.RuntimeStart = b.LoadAddr
	if h.Relocatable {
		align := guestmem.GuestAddress(h.KernelAlignment)
		b.RuntimeStart = (b.LoadAddr + align - 1) &^ (align - 1)
	}
	b.Entry64 = b.LoadAddr + entry64Offset
	if err := probe(r, b.SetupSize, b.KernelSize); err != nil {
		return nil, imageErr(img, b.SetupSize, wrapCause(ErrTruncated, err),
			"protected-mode kernel of %#x bytes (syssize %#x)", b.KernelSize, h.SysSize)
	}
	return b, nil
}

// probe checks that r has n bytes from off by reading the last one. A
// short file gives io.EOF, which the caller reports as ErrTruncated.
func probe(r io.ReaderAt, off int64, n uint64) error {
	if n == 0 {
		return nil
	}
	if n > 1<<62 || off > 1<<62 {
		return fmt.Errorf("size %#x at %#x out of range", n, off)
	}
	var b [1]byte
	_, err := r.ReadAt(b[:], off+int64(n)-1)
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("file ends before offset %#x", off+int64(n))
	}
	return err
}

// LoadBzImage loads a bzImage for the Linux/x86 64-bit boot protocol:
//   - the protected-mode kernel at its load address (BzImage.LoadAddr),
//     checked, with the InitSize bytes it needs from RuntimeStart, to lie
//     in one usable range of RAM at or above HighMemStart;
//   - the initrd, if any, page-aligned at the highest address it fits
//     below the PCI hole and initrd_addr_max, outside the kernel's extent;
//   - the command line at CmdlineAddr;
//   - boot_params at ZeroPageAddr: the image's setup header, with
//     type_of_loader, code32_start, ramdisk_image, ramdisk_size and
//     cmd_line_ptr set, and the E820 map of MemoryMap;
//   - a GDT at GDTAddr and an identity map at PML4Addr.
//
// The returned Entry's registers start the kernel at LoadAddr + 0x200 in
// 64-bit mode, RSI pointing at boot_params. Every check on the image,
// the options and the layout is made before anything is written; an error
// while copying (a file shorter than it said) can leave guest memory
// partly written.
func LoadBzImage(mem *guestmem.Memory, kernel io.ReaderAt, opts Options) (*Entry, error) {
	b, err := ParseBzImage(kernel)
	if err != nil {
		return nil, err
	}
	mm, err := bootMap(mem)
	if err != nil {
		return nil, err
	}
	if err := opts.check(); err != nil {
		return nil, err
	}
	limit := uint64(CmdlineMax - 1)
	if uint64(b.Header.CmdlineSize) < limit {
		limit = uint64(b.Header.CmdlineSize)
	}
	if uint64(len(opts.Cmdline)) > limit {
		return nil, placeErr("cmdline", ErrCmdlineTooLong, "%d bytes, the kernel's cmdline_size is %d (and the area holds %d)",
			len(opts.Cmdline), b.Header.CmdlineSize, CmdlineMax-1)
	}
	image := guestmem.Span{GPA: b.LoadAddr, Size: b.KernelSize}
	runtime := guestmem.Span{GPA: b.RuntimeStart, Size: uint64(b.Header.InitSize)}
	if err := mm.place(image.GPA, image.Size); err != nil {
		return nil, placeErr("bzImage", err, "protected-mode kernel [%v, +%#x)", image.GPA, image.Size)
	}
	if err := mm.place(runtime.GPA, runtime.Size); err != nil {
		return nil, placeErr("bzImage", err, "init_size %#x from the runtime start %v", runtime.Size, runtime.GPA)
	}
	extent := b.Extent()
	e := &Entry{Protocol: LinuxBoot64, Kernel: image, KernelExtent: extent, BootInfo: ZeroPageAddr, E820: mm, BzImage: b}
	// initrd_addr_max is the highest address the initrd may occupy.
	initrdLimit := min(guestmem.GuestAddress(b.Header.InitrdAddrMax)+1, PCIHoleStart)
	if e.Initrd, err = placeInitrd(mm, opts, initrdLimit, extent); err != nil {
		return nil, err
	}
	if err := copyKernel(mem, "bzImage", kernel, b.SetupSize, image.GPA, image.Size, image.Size); err != nil {
		return nil, err
	}
	if err := loadInitrd(mem, opts, e.Initrd); err != nil {
		return nil, err
	}
	if e.Cmdline, err = writeCmdline(mem, opts.Cmdline); err != nil {
		return nil, err
	}
	if err := write(mem, "boot_params", ZeroPageAddr, zeroPage(b, e)); err != nil {
		return nil, err
	}
	if err := write(mem, "GDT", GDTAddr, gdtBytes(gdt64)); err != nil {
		return nil, err
	}
	gib := identityMapGiB(mm)
	if err := write(mem, "page tables", PML4Addr, pageTables(gib)); err != nil {
		return nil, err
	}
	e.IdentityMap = guestmem.Span{GPA: 0, Size: uint64(gib) << 30}
	e.Regs = kvm64Regs(b.Entry64)
	e.sregs = long64Sregs()
	return e, nil
}

// zeroPage builds boot_params for b as loaded in e.
func zeroPage(b *BzImage, e *Entry) []byte {
	zp := make([]byte, zeroPageSize)
	copy(zp[offSetupSects:], b.hdr)
	le := binary.LittleEndian
	zp[offTypeOfLoader] = loaderUnknown
	le.PutUint32(zp[offCode32Start:], uint32(b.LoadAddr))
	le.PutUint32(zp[offRamdiskImage:], uint32(e.Initrd.GPA))
	le.PutUint32(zp[offRamdiskSize:], uint32(e.Initrd.Size))
	le.PutUint32(zp[offCmdLinePtr:], uint32(CmdlineAddr))
	// Built from zeros with the header copied from 0x1f1 on, boot_params
	// has a zero sentinel (0x1ef): the kernel trusts the fields around the
	// header to be cleared.
	zp[offSentinel] = 0
	zp[offE820Entries] = byte(len(e.E820))
	for i, m := range e.E820 {
		o := offE820Table + i*e820EntrySize
		le.PutUint64(zp[o:], uint64(m.GPA))
		le.PutUint64(zp[o+8:], m.Size)
		le.PutUint32(zp[o+16:], uint32(m.Type))
	}
	return zp
}
