package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// Request is a vhost-user request type, the header's first field.
type Request uint32

// The requests this package sends or answers, numbered as in the vhost-user
// specification.
const (
	GetFeatures         Request = 1
	SetFeatures         Request = 2
	SetOwner            Request = 3
	SetMemTable         Request = 5
	SetLogBase          Request = 6
	GetProtocolFeatures Request = 15
	SetProtocolFeatures Request = 16
	GetMaxMemSlots      Request = 36
	AddMemReg           Request = 37
	RemMemReg           Request = 38
)

var requestNames = map[Request]string{
	GetFeatures: "GET_FEATURES", SetFeatures: "SET_FEATURES", SetOwner: "SET_OWNER",
	SetMemTable: "SET_MEM_TABLE", SetLogBase: "SET_LOG_BASE", GetProtocolFeatures: "GET_PROTOCOL_FEATURES",
	SetProtocolFeatures: "SET_PROTOCOL_FEATURES", GetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	AddMemReg: "ADD_MEM_REG", RemMemReg: "REM_MEM_REG",
}

// String returns the specification's name without its VHOST_USER_ prefix,
// or the number for a request this package does not name.
func (r Request) String() string {
	if s, ok := requestNames[r]; ok {
		return s
	}
	return fmt.Sprintf("request %d", uint32(r))
}

// Header flags.
const (
	Version       = 0x1 // the protocol version, in the flags' low two bits
	FlagReply     = 0x4 // set on every reply from the back end
	FlagNeedReply = 0x8 // asks for a REPLY_ACK reply (a u64, 0 for success)
	versionMask   = 0x3
)

// Feature bits. FeatureProtocolFeatures is a virtio feature bit (GET_FEATURES)
// the back end sets when it answers GET/SET_PROTOCOL_FEATURES; FeatureLogAll
// is the vhost feature a front end sets (SET_FEATURES) to ask a back end to
// log its writes. The Protocol* bits are protocol features.
const (
	FeatureLogAll           = uint64(1) << 26
	FeatureProtocolFeatures = uint64(1) << 30

	ProtocolLogShmfd          = uint64(1) << 1  // SET_LOG_BASE carries a shared-memory log fd
	ProtocolReplyAck          = uint64(1) << 3  // FlagNeedReply is honoured
	ProtocolConfigureMemSlots = uint64(1) << 15 // GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG
)

// Sizes on the wire.
const (
	HeaderSize = 12 // request, flags, size: three u32s
	// MaxRegions is the most regions a SET_MEM_TABLE message carries.
	MaxRegions = 8
	regionSize = 32 // guest_phys_addr, memory_size, userspace_addr, mmap_offset
	// LogPage is the guest memory each bit of the dirty log stands for.
	LogPage = 4096
	// maxPayload bounds what a reader accepts; the largest message this
	// package knows, SET_MEM_TABLE with 8 regions, is 264 bytes.
	maxPayload = 4096
	// maxFDs is the most descriptors a message may carry (SET_MEM_TABLE's 8).
	maxFDs = MaxRegions
)

// ErrMalformed is wrapped by the error for a message that breaks the
// protocol: a bad version, a short or oversized payload, the wrong number
// of file descriptors, too many regions, overlapping regions, a region
// that wraps around the address space, and the like.
var ErrMalformed = errors.New("vhostuser: malformed message")

// ProtocolError describes a message that broke the protocol; it wraps
// ErrMalformed.
type ProtocolError struct {
	Request Request // the message's request
	Reason  string  // what is wrong with it
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("vhostuser: malformed %v message: %s", e.Request, e.Reason)
}

// Unwrap returns ErrMalformed.
func (e *ProtocolError) Unwrap() error { return ErrMalformed }

func malformed(r Request, format string, args ...any) error {
	return &ProtocolError{Request: r, Reason: fmt.Sprintf(format, args...)}
}

// Header is a message's header.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32 // payload bytes
}

// encode appends h in native byte order, as the specification says.
func (h Header) encode(b []byte) []byte {
	b = binary.NativeEndian.AppendUint32(b, uint32(h.Request))
	b = binary.NativeEndian.AppendUint32(b, h.Flags)
	return binary.NativeEndian.AppendUint32(b, h.Size)
}

// DecodeHeader decodes and checks a message header: the version must be 1
// and the payload at most 4096 bytes (no message this package knows is
// larger).
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, malformed(0, "header of %d bytes, want %d", len(b), HeaderSize)
	}
	h := Header{
		Request: Request(binary.NativeEndian.Uint32(b)),
		Flags:   binary.NativeEndian.Uint32(b[4:]),
		Size:    binary.NativeEndian.Uint32(b[8:]),
	}
	if v := h.Flags & versionMask; v != Version {
		return h, malformed(h.Request, "version %d, want %d", v, Version)
	}
	if h.Size > maxPayload {
		return h, malformed(h.Request, "payload of %d bytes exceeds %d", h.Size, maxPayload)
	}
	return h, nil
}

// MemoryRegion is one region of guest memory as vhost-user describes it: a
// range of guest-physical addresses, where the front end maps it, and where
// it starts in the file descriptor sent with it.
type MemoryRegion struct {
	GuestPhysAddr uint64 // guest-physical address of the first byte
	MemorySize    uint64 // bytes
	UserspaceAddr uint64 // the front end's host virtual address of the first byte
	MmapOffset    uint64 // offset of the first byte in the region's fd
}

// End returns the first guest-physical address past the region.
func (r MemoryRegion) End() uint64 { return r.GuestPhysAddr + r.MemorySize }

func (r MemoryRegion) encode(b []byte) []byte {
	for _, v := range [4]uint64{r.GuestPhysAddr, r.MemorySize, r.UserspaceAddr, r.MmapOffset} {
		b = binary.NativeEndian.AppendUint64(b, v)
	}
	return b
}

func decodeRegion(b []byte) MemoryRegion {
	return MemoryRegion{
		GuestPhysAddr: binary.NativeEndian.Uint64(b),
		MemorySize:    binary.NativeEndian.Uint64(b[8:]),
		UserspaceAddr: binary.NativeEndian.Uint64(b[16:]),
		MmapOffset:    binary.NativeEndian.Uint64(b[24:]),
	}
}

// check refuses a region a back end cannot map: empty, or wrapping around
// the guest, user or file address space.
func (r MemoryRegion) check(req Request) error {
	switch {
	case r.MemorySize == 0:
		return malformed(req, "region at guest address %#x has size 0", r.GuestPhysAddr)
	case r.GuestPhysAddr > math.MaxUint64-r.MemorySize:
		return malformed(req, "region at guest address %#x of %#x bytes wraps around", r.GuestPhysAddr, r.MemorySize)
	case r.UserspaceAddr > math.MaxUint64-r.MemorySize:
		return malformed(req, "region at user address %#x of %#x bytes wraps around", r.UserspaceAddr, r.MemorySize)
	case r.MmapOffset > math.MaxInt64-r.MemorySize:
		return malformed(req, "region at fd offset %#x of %#x bytes exceeds the largest file offset", r.MmapOffset,
			r.MemorySize)
	}
	return nil
}

// overlaps reports whether r and o share a guest-physical address.
func (r MemoryRegion) overlaps(o MemoryRegion) bool {
	return r.GuestPhysAddr < o.End() && o.GuestPhysAddr < r.End()
}

// EncodeMemTable returns SET_MEM_TABLE's payload: the region count, 4 bytes
// of padding, and the regions. At most MaxRegions regions fit.
func EncodeMemTable(regions []MemoryRegion) ([]byte, error) {
	if len(regions) > MaxRegions {
		return nil, fmt.Errorf("vhostuser: %d regions: %w", len(regions), ErrTooManyRegions)
	}
	b := make([]byte, 0, 8+regionSize*len(regions))
	b = binary.NativeEndian.AppendUint32(b, uint32(len(regions)))
	b = binary.NativeEndian.AppendUint32(b, 0)
	for _, r := range regions {
		b = r.encode(b)
	}
	return b, nil
}

// DecodeMemTable decodes and checks SET_MEM_TABLE's payload, sent with nfds
// file descriptors. The payload must hold exactly its regions — QEMU sends
// 8 + 32·n bytes; a payload padded to all 8 regions, as some front ends
// send, is accepted too — with one fd per region, at most MaxRegions, none
// empty, wrapping or overlapping another.
func DecodeMemTable(payload []byte, nfds int) ([]MemoryRegion, error) {
	if len(payload) < 8 {
		return nil, malformed(SetMemTable, "payload of %d bytes, want at least 8", len(payload))
	}
	n := binary.NativeEndian.Uint32(payload)
	if n > MaxRegions {
		return nil, malformed(SetMemTable, "%d regions, at most %d fit", n, MaxRegions)
	}
	if want := 8 + regionSize*int(n); len(payload) != want && len(payload) != 8+regionSize*MaxRegions {
		return nil, malformed(SetMemTable, "payload of %d bytes for %d regions, want %d", len(payload), n, want)
	}
	if nfds != int(n) {
		return nil, malformed(SetMemTable, "%d file descriptors for %d regions", nfds, n)
	}
	regions := make([]MemoryRegion, n)
	for i := range regions {
		regions[i] = decodeRegion(payload[8+regionSize*i:])
		if err := regions[i].check(SetMemTable); err != nil {
			return nil, err
		}
		for j := range i {
			if regions[i].overlaps(regions[j]) {
				return nil, malformed(SetMemTable, "region %d [%#x, %#x) overlaps region %d [%#x, %#x)", i,
					regions[i].GuestPhysAddr, regions[i].End(), j, regions[j].GuestPhysAddr, regions[j].End())
			}
		}
	}
	return regions, nil
}

// EncodeMemRegion returns the payload of ADD_MEM_REG and REM_MEM_REG: 8
// bytes of padding, then the region.
func EncodeMemRegion(r MemoryRegion) []byte {
	return r.encode(make([]byte, 8, 8+regionSize))
}

// DecodeMemRegion decodes and checks the payload of ADD_MEM_REG or
// REM_MEM_REG (req), sent with nfds file descriptors: ADD_MEM_REG carries
// exactly one; REM_MEM_REG none, or one, which the specification lets a
// back end accept from older front ends (and which it must then close).
func DecodeMemRegion(req Request, payload []byte, nfds int) (MemoryRegion, error) {
	if len(payload) != 8+regionSize {
		return MemoryRegion{}, malformed(req, "payload of %d bytes, want %d", len(payload), 8+regionSize)
	}
	switch {
	case req == AddMemReg && nfds != 1:
		return MemoryRegion{}, malformed(req, "%d file descriptors, want 1", nfds)
	case req == RemMemReg && nfds > 1:
		return MemoryRegion{}, malformed(req, "%d file descriptors, want none", nfds)
	case req != AddMemReg && req != RemMemReg:
		return MemoryRegion{}, malformed(req, "not a single-region message")
	}
	r := decodeRegion(payload[8:])
	return r, r.check(req)
}

// LogArea is SET_LOG_BASE's payload: where in the fd sent with it the dirty
// log starts, and its size. The log is one bit per 4 KiB guest page from
// guest address 0: page p is bit p%8 of byte p/8.
type LogArea struct {
	Size   uint64 // bytes of log
	Offset uint64 // offset of the log (the bit of guest address 0) in the fd
}

// Encode returns the payload: mmap_size, then mmap_offset.
func (l LogArea) Encode() []byte {
	b := binary.NativeEndian.AppendUint64(nil, l.Size)
	return binary.NativeEndian.AppendUint64(b, l.Offset)
}

// DecodeLogArea decodes and checks SET_LOG_BASE's payload, sent with nfds
// file descriptors (one: the log's). The log must not be empty, and its
// offset and size are multiples of 8, since back ends set its bits 64 at a
// time.
func DecodeLogArea(payload []byte, nfds int) (LogArea, error) {
	if len(payload) != 16 {
		return LogArea{}, malformed(SetLogBase, "payload of %d bytes, want 16", len(payload))
	}
	if nfds != 1 {
		return LogArea{}, malformed(SetLogBase, "%d file descriptors, want 1 (the log's)", nfds)
	}
	l := LogArea{Size: binary.NativeEndian.Uint64(payload), Offset: binary.NativeEndian.Uint64(payload[8:])}
	switch {
	case l.Size == 0:
		return l, malformed(SetLogBase, "empty log")
	case l.Size%8 != 0 || l.Offset%8 != 0:
		return l, malformed(SetLogBase, "log of %#x bytes at offset %#x: both must be multiples of 8", l.Size, l.Offset)
	case l.Offset > math.MaxInt64-l.Size:
		return l, malformed(SetLogBase, "log of %#x bytes at offset %#x exceeds the largest file offset", l.Size, l.Offset)
	}
	return l, nil
}

// LogSize returns the bytes of log that cover guest addresses [0, end): one
// bit per 4 KiB page, rounded up to whole 64-bit words, as QEMU sizes it.
func LogSize(end uint64) uint64 {
	pages := end/LogPage + min(end%LogPage, 1)
	return (pages + 63) / 64 * 8
}

func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }

func decodeU64(req Request, payload []byte) (uint64, error) {
	if len(payload) != 8 {
		return 0, malformed(req, "payload of %d bytes, want 8", len(payload))
	}
	return binary.NativeEndian.Uint64(payload), nil
}
