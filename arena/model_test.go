package arena_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/procfs"
)

// The op engine below drives an arena and a plain reference model with the
// same operations, and checks after each one that the arena's result, its
// Mappings(), /proc/self/maps and the memory's contents all agree with the
// model. fzRun (fuzz_test.go) drives it: FuzzArenaOps with fuzz input,
// TestArenaOpsRandom and the guard test with pseudo-random input.

const modelPages = 32

// modelPage is what the model knows about one page of the arena.
type modelPage struct {
	mapped bool
	prot   arena.Protection
	anon   bool
	shared bool
	fdPage int64  // page of the memfd mapped here (fd pages)
	data   []byte // contents of an anonymous page; nil means zeros
}

type engine struct {
	t     testing.TB
	a     *arena.Arena
	fd    int
	ino   uint64
	pages [modelPages]modelPage
	step  int
	// outcomes counts, per operation name, how often it succeeded and
	// failed, so tests can check the input really exercised both.
	outcomes map[string]*[2]int
}

func newEngine(t testing.TB) *engine {
	a, err := arena.New(modelPages * page)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.MemfdCreate("model", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, 2*modelPages*page); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return &engine{t: t, a: a, fd: fd, ino: st.Ino, outcomes: map[string]*[2]int{}}
}

func (e *engine) close() {
	if err := e.a.Close(); err != nil {
		e.t.Fatal(err)
	}
	unix.Close(e.fd)
}

// input hands out bytes of fuzz input, then zeros.
type input struct{ b []byte }

func (in *input) next() byte {
	if len(in.b) == 0 {
		return 0
	}
	c := in.b[0]
	in.b = in.b[1:]
	return c
}

func (in *input) empty() bool { return len(in.b) == 0 }

var prots = []arena.Protection{arena.ProtNone, arena.ProtRead, arena.ProtReadWrite}

// rangeArg decodes a page-granular (offset, length), sometimes out of range,
// unaligned or empty.
func rangeArg(in *input) (off, n int64) {
	off = int64(in.next()%(modelPages+4)) * page
	n = int64(in.next()%9) * page
	if f := in.next(); f%16 == 0 {
		off++
	} else if f%16 == 1 {
		n++
	} else if f%16 == 2 {
		off = -page
	}
	return off, n
}

// violations lists the sentinels a page-granular call on [off, off+n) may
// fail with; an empty list means it must succeed (unless needMapped finds a
// hole, or overlap applies).
func violations(off, n int64) []error {
	var v []error
	if n == 0 {
		v = append(v, arena.ErrZeroSize)
	}
	if off < 0 || n < 0 || off+n > modelPages*page {
		v = append(v, arena.ErrOutOfRange)
	}
	if off%page != 0 || n%page != 0 {
		v = append(v, arena.ErrUnaligned)
	}
	return v
}

func (e *engine) mappedRange(off, n int64) bool {
	for p := off / page; p < (off+n)/page; p++ {
		if !e.pages[p].mapped {
			return false
		}
	}
	return true
}

func (e *engine) expect(op string, err error, allowed []error) {
	e.t.Helper()
	name, _, _ := strings.Cut(op, "(")
	if e.outcomes[name] == nil {
		e.outcomes[name] = new([2]int)
	}
	if err == nil {
		e.outcomes[name][0]++
	} else {
		e.outcomes[name][1]++
	}
	if len(allowed) == 0 {
		if err != nil {
			e.t.Fatalf("step %d: %s: unexpected error %v", e.step, op, err)
		}
		return
	}
	if err == nil {
		e.t.Fatalf("step %d: %s: succeeded, want one of %v", e.step, op, allowed)
	}
	for _, want := range allowed {
		if errors.Is(err, want) {
			return
		}
	}
	e.t.Fatalf("step %d: %s: error %v, want one of %v", e.step, op, err, allowed)
}

func (e *engine) apply(in *input) {
	e.step++
	switch in.next() % 6 {
	case 0, 1: // AddAnonMapping / AddFDMapping
		fdMap := in.b != nil && in.next()%2 == 0
		off, n := rangeArg(in)
		prot := prots[in.next()%3]
		flags := in.next()
		replace, private := flags&1 != 0, flags&2 != 0 && !fdMap
		fdPage := int64(in.next() % modelPages)
		var opts []arena.Option
		if replace {
			opts = append(opts, arena.Replace())
		}
		if private {
			opts = append(opts, arena.Private())
		}
		var err error
		op := fmt.Sprintf("AddAnonMapping(%#x, %#x, %v, replace=%v private=%v)", off, n, prot, replace, private)
		if fdMap {
			op = fmt.Sprintf("AddFDMapping(%#x, %#x, fd page %d, %v, replace=%v)", off, n, fdPage, prot, replace)
			err = e.a.AddFDMapping(off, n, e.fd, fdPage*page, prot, opts...)
		} else {
			err = e.a.AddAnonMapping(off, n, prot, opts...)
		}
		v := violations(off, n)
		if len(v) == 0 && !replace {
			for p := off / page; p < (off+n)/page; p++ {
				if e.pages[p].mapped {
					v = append(v, arena.ErrOverlap)
					break
				}
			}
		}
		e.expect(op, err, v)
		if err == nil {
			for i, p := int64(0), off/page; p < (off+n)/page; i, p = i+1, p+1 {
				e.pages[p] = modelPage{mapped: true, prot: prot, anon: !fdMap, shared: !private, fdPage: fdPage + i}
			}
		}
	case 2: // RemoveMapping
		off, n := rangeArg(in)
		err := e.a.RemoveMapping(off, n)
		v := violations(off, n)
		if len(v) == 0 && !e.mappedRange(off, n) {
			v = append(v, arena.ErrNotMapped)
		}
		e.expect(fmt.Sprintf("RemoveMapping(%#x, %#x)", off, n), err, v)
		if err == nil {
			for p := off / page; p < (off+n)/page; p++ {
				e.pages[p] = modelPage{}
			}
		}
	case 3: // Protect
		off, n := rangeArg(in)
		prot := prots[in.next()%3]
		err := e.a.Protect(off, n, prot)
		v := violations(off, n)
		if len(v) == 0 && !e.mappedRange(off, n) {
			v = append(v, arena.ErrNotMapped)
		}
		e.expect(fmt.Sprintf("Protect(%#x, %#x, %v)", off, n, prot), err, v)
		if err == nil {
			for p := off / page; p < (off+n)/page; p++ {
				e.pages[p].prot = prot
			}
		}
	case 4: // WriteAt
		off := int64(in.next())*251 + int64(in.next()) // byte-granular, up to ~64 KiB
		n := int64(in.next()) * 97                     // up to ~24 KiB
		val := in.next() | 1
		e.write(off, n, val)
	case 5: // ReadAt
		off := int64(in.next())*251 + int64(in.next())
		n := int64(in.next()) * 97
		e.read(off, n)
	}
}

// accessible returns how many bytes from off can be accessed with prot
// before the first page that does not allow it.
func (e *engine) accessible(off, n int64, need arena.Protection) int64 {
	done := int64(0)
	for done < n {
		p := (off + done) / page
		if e.pages[p].prot&need != need {
			return done
		}
		done += min(n-done, (p+1)*page-(off+done))
	}
	return done
}

func (e *engine) write(off, n int64, val byte) {
	size := int64(modelPages * page)
	buf := bytes.Repeat([]byte{val}, int(n))
	got, err := e.a.WriteAt(buf, off)
	op := fmt.Sprintf("WriteAt(%#x, %#x)", off, n)
	switch {
	case n == 0:
		e.expect(op, err, nil)
		return
	case off+n > size:
		e.expect(op, err, []error{arena.ErrOutOfRange})
		return
	case !e.byteRangeMapped(off, n):
		e.expect(op, err, []error{arena.ErrNotMapped})
		return
	}
	want := e.accessible(off, n, arena.ProtWrite)
	if want < n {
		e.expect(op, err, []error{arena.ErrFault})
	} else {
		e.expect(op, err, nil)
	}
	if int64(got) != want {
		e.t.Fatalf("step %d: %s wrote %d bytes, model says %d", e.step, op, got, want)
	}
	for i := int64(0); i < want; i++ {
		pg := &e.pages[(off+i)/page]
		if pg.anon {
			if pg.data == nil {
				pg.data = make([]byte, page)
			}
			pg.data[(off+i)%page] = val
		}
	}
}

func (e *engine) byteRangeMapped(off, n int64) bool {
	for p := off / page; p <= (off+n-1)/page; p++ {
		if !e.pages[p].mapped {
			return false
		}
	}
	return true
}

func (e *engine) read(off, n int64) {
	size := int64(modelPages * page)
	buf := make([]byte, n)
	got, err := e.a.ReadAt(buf, off)
	op := fmt.Sprintf("ReadAt(%#x, %#x)", off, n)
	switch {
	case n == 0:
		e.expect(op, err, nil)
		return
	case off > size:
		e.expect(op, err, []error{arena.ErrOutOfRange})
		return
	case off == size:
		e.expect(op, err, []error{io.EOF})
		return
	}
	eof := off+n > size
	n = min(n, size-off)
	if !e.byteRangeMapped(off, n) {
		e.expect(op, err, []error{arena.ErrNotMapped})
		return
	}
	want := e.accessible(off, n, arena.ProtRead)
	switch {
	case want < n:
		e.expect(op, err, []error{arena.ErrFault})
	case eof:
		e.expect(op, err, []error{io.EOF})
	default:
		e.expect(op, err, nil)
	}
	if int64(got) != want {
		e.t.Fatalf("step %d: %s read %d bytes, model says %d", e.step, op, got, want)
	}
	if exp := e.expected(off, want); !bytes.Equal(buf[:want], exp) {
		e.t.Fatalf("step %d: %s read different data than the model holds", e.step, op)
	}
}

// expected is what the model says [off, off+n) holds.
func (e *engine) expected(off, n int64) []byte {
	out := make([]byte, 0, n)
	for pos := off; pos < off+n; {
		p := pos / page
		chunk := min(off+n-pos, (p+1)*page-pos)
		pg := e.pages[p]
		in := pos % page
		switch {
		case !pg.anon:
			b := make([]byte, chunk)
			if _, err := unix.Pread(e.fd, b, pg.fdPage*page+in); err != nil {
				e.t.Fatal(err)
			}
			out = append(out, b...)
		case pg.data == nil:
			out = append(out, make([]byte, chunk)...)
		default:
			out = append(out, pg.data[in:in+chunk]...)
		}
		pos += chunk
	}
	return out
}

// checkLayout compares the model with Mappings() and /proc/self/maps page by page.
func (e *engine) checkLayout() {
	e.t.Helper()
	var fromInfo [modelPages]modelPage
	for _, mi := range e.a.Mappings() {
		for i := int64(0); i < mi.Size/page; i++ {
			fromInfo[mi.Offset/page+i] = modelPage{mapped: true, prot: mi.Prot, anon: mi.Anonymous,
				shared: mi.Shared, fdPage: mi.FDOffset/page + i}
		}
	}
	vmas := pmParse(e.t)
	for p := range e.pages {
		want := e.pages[p]
		got := fromInfo[p]
		if want.mapped != got.mapped || (want.mapped && (want.prot != got.prot || want.anon != got.anon ||
			want.shared != got.shared || (!want.anon && want.fdPage != got.fdPage))) {
			e.t.Fatalf("step %d: page %d: Mappings() says %+v, model %+v", e.step, p, got, want)
		}
		addr := e.a.Addr() + uintptr(p)*uintptr(page)
		v, ok := pmFind(vmas, addr)
		if !ok {
			e.t.Fatalf("step %d: page %d (%#x) is a hole in /proc/self/maps", e.step, p, addr)
		}
		perms := "---p"
		if want.mapped {
			perms = want.prot.String()
			if want.shared {
				perms += "s"
			} else {
				perms += "p"
			}
		}
		if v.perms != perms {
			e.t.Fatalf("step %d: page %d: /proc/self/maps says %s, model %s", e.step, p, v.perms, perms)
		}
		if want.mapped && !want.anon {
			fileOff := v.offset + uint64(addr-v.start)
			if v.inode != e.ino || fileOff != uint64(want.fdPage*page) {
				e.t.Fatalf("step %d: page %d: maps has inode %d offset %#x, model inode %d page %d",
					e.step, p, v.inode, fileOff, e.ino, want.fdPage)
			}
		}
	}
}

// checkData reads every readable page through the arena and compares it with
// the model, whose fd pages come from the memfd itself.
func (e *engine) checkData() {
	e.t.Helper()
	for p := int64(0); p < modelPages; p++ {
		if !e.pages[p].mapped || e.pages[p].prot&arena.ProtRead == 0 {
			continue
		}
		buf := make([]byte, page)
		if _, err := e.a.ReadAt(buf, p*page); err != nil {
			e.t.Fatalf("page %d: %v", p, err)
		}
		if !bytes.Equal(buf, e.expected(p*page, page)) {
			e.t.Fatalf("page %d: arena and model (or memfd) disagree", p)
		}
	}
}

// pmVMA is one line of /proc/self/maps.
type pmVMA struct {
	start, end uintptr
	perms      string
	offset     uint64
	inode      uint64
}

func pmParse(t testing.TB) []pmVMA {
	t.Helper()
	vmas, err := procfs.Maps()
	if err != nil {
		t.Fatal(err)
	}
	out := make([]pmVMA, len(vmas))
	for i, v := range vmas {
		out[i] = pmVMA{start: v.Start, end: v.End, perms: v.Perms, offset: v.Offset, inode: v.Inode}
	}
	return out
}

func pmFind(vmas []pmVMA, addr uintptr) (pmVMA, bool) {
	for _, v := range vmas {
		if v.start <= addr && addr < v.end {
			return v, true
		}
	}
	return pmVMA{}, false
}
