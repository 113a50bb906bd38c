package procfs

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"
)

// VMA is one kernel virtual memory area of a process, as /proc/<pid>/maps
// and /proc/<pid>/smaps report it (proc(5)). The size fields are bytes and
// come from smaps only: Maps leaves them zero.
type VMA struct {
	Start, End uintptr
	Perms      string // "rw-p": read, write, execute, then s (shared) or p (private)
	Offset     uint64 // file offset of Start
	Dev        string // device of the file, major:minor in hex as the kernel prints it: "fe:01"
	Inode      uint64 // 0 for anonymous memory
	// Path is the file, a pseudo-path ("[heap]", "[stack]", "[anon:name]",
	// "anon_inode:kvm-vcpu:0", "/memfd:guest"), or "" for anonymous memory,
	// exactly as the kernel prints it: with its spaces, and with " (deleted)"
	// after it when the file was unlinked (a memfd always is).
	Path string

	Size           int64
	KernelPageSize int64 // the page size of the backing: 2 MiB for a 2 MiB hugetlb VMA
	MMUPageSize    int64
	Rss            int64 // resident; hugetlb pages are not counted here
	Pss            int64
	PssDirty       int64 // Pss_Dirty
	SharedClean    int64 // Shared_Clean
	SharedDirty    int64 // Shared_Dirty
	PrivateClean   int64 // Private_Clean
	PrivateDirty   int64 // Private_Dirty
	Referenced     int64
	Anonymous      int64
	KSM            int64
	LazyFree       int64
	AnonHugePages  int64 // anonymous memory mapped by transparent hugepages
	ShmemPmdMapped int64 // shmem (memfd) memory mapped with huge PMDs
	FilePmdMapped  int64 // file memory mapped with huge PMDs
	SharedHugetlb  int64 // Shared_Hugetlb
	PrivateHugetlb int64 // Private_Hugetlb
	Swap           int64
	SwapPss        int64
	Locked         int64 // locked by mlock
	THPEligible    bool  // THPeligible: 1

	// Flags are the VmFlags mnemonics, e.g. "rd", "wr", "lf", "hg", "dd";
	// nil from Maps.
	Flags []string
}

// Contains reports whether addr is inside the VMA.
func (v *VMA) Contains(addr uintptr) bool { return v.Start <= addr && addr < v.End }

// HasFlag reports whether the VMA carries the VmFlags mnemonic f.
func (v *VMA) HasFlag(f string) bool {
	for _, g := range v.Flags {
		if g == f {
			return true
		}
	}
	return false
}

// Maps returns every VMA of this process from /proc/self/maps, lowest
// address first. It is much cheaper than Smaps: the kernel walks no page
// tables for it.
func Maps() ([]VMA, error) { return read("/proc/self/maps", 0, math.MaxUint) }

// Smaps returns every VMA of this process from /proc/self/smaps, with its
// sizes and flags, lowest address first.
func Smaps() ([]VMA, error) { return read("/proc/self/smaps", 0, math.MaxUint) }

// SmapsRange returns the VMAs of this process that intersect [lo, hi), from
// /proc/self/smaps, lowest address first. It parses only those and stops
// reading at the first VMA past hi, which spares the kernel the work of
// reporting the rest.
func SmapsRange(lo, hi uintptr) ([]VMA, error) { return read("/proc/self/smaps", lo, hi) }

// SmapsRollup returns /proc/<pid>/smaps_rollup: the sizes of smaps summed
// over every VMA of process pid, as one VMA spanning them all whose Path is
// "[rollup]". Reading another process's needs ptrace access to it.
func SmapsRollup(pid int) (VMA, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/smaps_rollup"
	vmas, err := read(path, 0, math.MaxUint)
	if err != nil {
		return VMA{}, err
	}
	if len(vmas) != 1 {
		return VMA{}, fmt.Errorf("procfs: %s has %d records, want 1", path, len(vmas))
	}
	return vmas[0], nil
}

// bufPool holds read buffers: smaps is read on every arena Stats call.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// maxLine bounds a line: a header is about 75 bytes before a path of at
// most PATH_MAX, escaped.
const maxLine = 1 << 20

func read(path string, lo, hi uintptr) ([]VMA, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("procfs: %w", err)
	}
	defer f.Close()
	vmas, err := parse(f, lo, hi)
	if err != nil {
		return nil, fmt.Errorf("procfs: reading %s: %w", path, err)
	}
	return vmas, nil
}

// parse reads maps or smaps text (a maps file is an smaps file without the
// fields) and returns the VMAs intersecting [lo, hi). Lines it does not
// understand are skipped, so that a field a newer kernel adds, or changes,
// costs that field and not the whole read.
func parse(r io.Reader, lo, hi uintptr) ([]VMA, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	sc := bufio.NewScanner(r)
	sc.Buffer(*bp, maxLine)
	var out []VMA
	var cur *VMA // the VMA the field lines below belong to; nil if skipped
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 {
			continue
		}
		if c := line[0]; c >= 'A' && c <= 'Z' { // a field: headers start with a hex digit
			if cur != nil {
				cur.setField(line)
			}
			continue
		}
		start, end, rest, ok := parseRange(line)
		if !ok {
			continue
		}
		cur = nil
		if start >= hi {
			break // VMAs come in address order
		}
		if end <= lo {
			continue
		}
		v, ok := parseHeader(start, end, rest)
		if !ok {
			continue
		}
		out = append(out, v)
		cur = &out[len(out)-1]
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// parseRange parses the "start-end " that opens a VMA's header line.
func parseRange(line []byte) (start, end uintptr, rest []byte, ok bool) {
	s, line, ok1 := hexUntil(line, '-')
	e, line, ok2 := hexUntil(line, ' ')
	return uintptr(s), uintptr(e), line, ok1 && ok2
}

// parseHeader parses the rest of a header after its range:
// "perms offset dev inode [path]".
func parseHeader(start, end uintptr, b []byte) (VMA, bool) {
	v := VMA{Start: start, End: end}
	perms, b, ok1 := cut(b)
	off, b, ok2 := hexUntil(b, ' ')
	dev, b, ok3 := cut(b)
	ino, b, ok4 := decUntil(b, ' ')
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return VMA{}, false
	}
	v.Perms, v.Offset, v.Dev, v.Inode = intern(perms), off, intern(dev), ino
	b = bytes.TrimLeft(b, " ")
	if len(b) > 0 {
		v.Path = string(b)
	}
	return v, true
}

// setField records one "Key: value" line of smaps.
func (v *VMA) setField(line []byte) {
	colon := bytes.IndexByte(line, ':')
	if colon < 0 {
		return
	}
	key, val := line[:colon], bytes.TrimLeft(line[colon+1:], " ")
	switch string(key) {
	case "VmFlags":
		v.Flags = strings.Fields(string(val))
		return
	case "THPeligible":
		v.THPEligible = len(val) > 0 && val[0] == '1'
		return
	}
	n, kb, ok := decUntil(val, ' ')
	if !ok || string(kb) != "kB" || n > math.MaxInt64>>10 {
		return
	}
	b := int64(n) << 10
	var p *int64
	switch string(key) {
	case "Size":
		p = &v.Size
	case "KernelPageSize":
		p = &v.KernelPageSize
	case "MMUPageSize":
		p = &v.MMUPageSize
	case "Rss":
		p = &v.Rss
	case "Pss":
		p = &v.Pss
	case "Pss_Dirty":
		p = &v.PssDirty
	case "Shared_Clean":
		p = &v.SharedClean
	case "Shared_Dirty":
		p = &v.SharedDirty
	case "Private_Clean":
		p = &v.PrivateClean
	case "Private_Dirty":
		p = &v.PrivateDirty
	case "Referenced":
		p = &v.Referenced
	case "Anonymous":
		p = &v.Anonymous
	case "KSM":
		p = &v.KSM
	case "LazyFree":
		p = &v.LazyFree
	case "AnonHugePages":
		p = &v.AnonHugePages
	case "ShmemPmdMapped":
		p = &v.ShmemPmdMapped
	case "FilePmdMapped":
		p = &v.FilePmdMapped
	case "Shared_Hugetlb":
		p = &v.SharedHugetlb
	case "Private_Hugetlb":
		p = &v.PrivateHugetlb
	case "Swap":
		p = &v.Swap
	case "SwapPss":
		p = &v.SwapPss
	case "Locked":
		p = &v.Locked
	default:
		return
	}
	*p = b
}

// cut returns b up to the next space, and what follows the spaces after it.
func cut(b []byte) (field, rest []byte, ok bool) {
	i := bytes.IndexByte(b, ' ')
	if i <= 0 {
		return nil, nil, false
	}
	return b[:i], bytes.TrimLeft(b[i+1:], " "), true
}

// hexUntil parses the hex number that runs up to sep, and returns what
// follows sep. A number may not be empty or overflow 64 bits.
func hexUntil(b []byte, sep byte) (n uint64, rest []byte, ok bool) {
	i := 0
	for ; i < len(b) && b[i] != sep; i++ {
		c := b[i]
		var d byte
		switch {
		case c >= '0' && c <= '9':
			d = c - '0'
		case c >= 'a' && c <= 'f':
			d = c - 'a' + 10
		default:
			return 0, nil, false
		}
		if n>>60 != 0 {
			return 0, nil, false
		}
		n = n<<4 | uint64(d)
	}
	if i == 0 || i == len(b) {
		return 0, nil, false
	}
	return n, b[i+1:], true
}

// decUntil parses the decimal number that runs up to sep or the end of b,
// and returns what follows, the spaces after sep skipped.
func decUntil(b []byte, sep byte) (n uint64, rest []byte, ok bool) {
	i := 0
	for ; i < len(b) && b[i] != sep; i++ {
		c := b[i]
		if c < '0' || c > '9' || n > (math.MaxUint64-9)/10 {
			return 0, nil, false
		}
		n = n*10 + uint64(c-'0')
	}
	if i == 0 {
		return 0, nil, false
	}
	if i < len(b) {
		i++
	}
	return n, bytes.TrimLeft(b[i:], " "), true
}

// intern returns the common permission and device strings without
// allocating.
func intern(b []byte) string {
	switch string(b) {
	case "---p":
		return "---p"
	case "r--p":
		return "r--p"
	case "rw-p":
		return "rw-p"
	case "r-xp":
		return "r-xp"
	case "rw-s":
		return "rw-s"
	case "r--s":
		return "r--s"
	case "00:00":
		return "00:00"
	}
	return string(b)
}
