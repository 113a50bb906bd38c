//go:build amd64

package boot

import (
	"errors"
	"fmt"
)

// Sentinels of a kernel that cannot be booted as given. Each is wrapped in
// an *ImageError that says which image and which part of it; errors.Is
// matches the sentinel, errors.As the *ImageError. Like guestmem's, the
// sentinels carry no package prefix: the *ImageError adds it once.
var (
	// ErrBadMagic: the file is not the format asked for — no "HdrS" at
	// 0x202 of a bzImage, no ELF magic in a vmlinux, neither for Load.
	ErrBadMagic = errors.New("bad magic")
	// ErrProtocolVersion: the bzImage's boot protocol is older than 2.06.
	ErrProtocolVersion = errors.New("boot protocol older than 2.06")
	// ErrNot64Bit: the kernel has no 64-bit entry point: a bzImage without
	// XLF_KERNEL_64 (or older than protocol 2.12, which introduced it), or
	// an ELF that is not ELFCLASS64 little-endian x86-64.
	ErrNot64Bit = errors.New("no 64-bit entry point")
	// ErrBadHeader: a header field the loader cannot use — LOADED_HIGH
	// clear (a zImage), a kernel_alignment that is not a power of two, a
	// zero syssize, a segment whose file size exceeds its memory size, an
	// entry point outside the loaded segments, a malformed note.
	ErrBadHeader = errors.New("invalid header field")
	// ErrTruncated: the file ends before the data its headers describe
	// (also an initrd shorter than Options.InitrdSize).
	ErrTruncated = errors.New("file truncated")
	// ErrNoPVHNote: an ELF kernel without the PVH entry note
	// (XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment).
	ErrNoPVHNote = errors.New("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
	// ErrNoRoom: the kernel or initrd does not fit in usable guest RAM: it
	// runs past the top of RAM, or no usable range below the PCI hole
	// (and initrd_addr_max) is large enough for the initrd.
	ErrNoRoom = errors.New("does not fit in guest RAM")
	// ErrHole: the kernel's range crosses a hole in the layout or a range
	// the memory map reserves (the PCI hole, the BIOS area, a read-only
	// region).
	ErrHole = errors.New("overlaps a hole or reserved range")
	// ErrOverlap: the kernel's range starts below HighMemStart, where the
	// loader's boot data (zero page, page tables, command line) and the
	// BIOS area are.
	ErrOverlap = errors.New("below 1 MiB: overlaps the boot data or BIOS area")
	// ErrCmdlineTooLong: the command line is longer than the kernel's
	// cmdline_size, or than the command-line area (CmdlineMax).
	ErrCmdlineTooLong = errors.New("command line too long")
)

// Errors about what the caller asked for rather than the image. They are
// returned wrapped ("boot: ...: %w"), not in an *ImageError.
var (
	// ErrBadOption: an Options value the loader cannot use: a NUL byte in
	// the command line, an Initrd without a positive InitrdSize, or an
	// InitrdSize without an Initrd.
	ErrBadOption = errors.New("invalid option")
	// ErrLayout: the guest memory cannot hold a PC boot: no RAM for the
	// boot data below HighMemStart, RAM inside the PCI hole, or more than
	// E820Max entries in the memory map.
	ErrLayout = errors.New("memory layout unsuitable for booting")
)

// ImageError reports a kernel, initrd or command line that cannot be booted
// as given, and where the problem is.
type ImageError struct {
	// Image is what the error is about: "bzImage", "vmlinux" (an ELF
	// entered through PVH), "kernel" (Load could not tell the format),
	// "initrd" or "cmdline".
	Image string
	// What names the part at fault, with its value: "setup header version
	// 0x205", "PT_LOAD 1 [0x1000000, +0x2000)", "initrd of 0x4000 bytes".
	What string
	// Offset is the file offset of the bad field or data, or -1 when the
	// problem is where something would go in guest memory.
	Offset int64
	// Err is the sentinel (ErrBadMagic, ErrNoRoom, ...), possibly wrapping
	// the underlying cause (an io error, a guestmem error).
	Err error
}

// Error says which image, what in it, where in the file, and the sentinel:
// "boot: bzImage: syssize 0 (file offset 0x1f4): invalid header field".
func (e *ImageError) Error() string {
	at := ""
	if e.Offset >= 0 {
		at = fmt.Sprintf(" (file offset %#x)", e.Offset)
	}
	return fmt.Sprintf("boot: %s: %s%s: %v", e.Image, e.What, at, e.Err)
}

// Unwrap returns the sentinel (and through it any cause it wraps).
func (e *ImageError) Unwrap() error { return e.Err }

// imageErr builds an *ImageError about a file field at off.
func imageErr(image string, off int64, err error, format string, args ...any) *ImageError {
	return &ImageError{Image: image, What: fmt.Sprintf(format, args...), Offset: off, Err: err}
}

// placeErr builds an *ImageError about a placement in guest memory.
func placeErr(image string, err error, format string, args ...any) *ImageError {
	return imageErr(image, -1, err, format, args...)
}

// wrapCause returns sentinel, wrapping cause when there is one, so both
// match errors.Is.
func wrapCause(sentinel, cause error) error {
	if cause == nil {
		return sentinel
	}
	return fmt.Errorf("%w: %w", sentinel, cause)
}
