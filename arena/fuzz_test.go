package arena_test

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// FuzzArenaOps drives random Add/Remove/Protect/Write/Read sequences against
// the reference model in model_test.go: every result, Mappings(),
// /proc/self/maps and the memory's contents (through the arena and through
// the memfd) must agree with the model. fzRun adds the edge operations below
// (accesses at both ends of the arena and past it, rejected arguments, exec
// protection) to the model's own.
func FuzzArenaOps(f *testing.F) {
	f.Add([]byte{0, 0, 0, 8, 2, 3, 1})                                  // add anon over the first pages
	f.Add([]byte{1, 0, 4, 4, 3, 2, 0, 5, 4, 0, 20, 9, 5, 0, 10, 12})    // fd mapping, write, read
	f.Add([]byte{0, 0, 0, 8, 3, 2, 0, 2, 2, 2, 3, 3, 1, 1, 5, 0, 0, 0}) // add, remove the middle, protect
	f.Add([]byte{0, 0, 30, 8, 3, 2, 0, 3, 33, 2, 0, 0})                 // ranges past the end
	f.Add([]byte{1, 0, 2, 6, 3, 1, 7, 1, 0, 4, 4, 3, 3, 9, 4, 1, 2})    // overlapping fd mappings with replace
	// fd mapping over the last 8 pages, then edge writes and reads across
	// the end of the arena and before its start.
	f.Add([]byte{1, 0, 24, 8, 3, 2, 0, 3, 0xe0, 1, 150, 0x85, 7, 0xe0, 1, 0, 0x90, 0xe0, 0, 1, 100, 0x82, 9, 0xe0, 0, 0, 0, 40, 3})
	// anon mapping, exec protection on part of it, bad arguments of each kind.
	f.Add([]byte{0, 1, 4, 6, 3, 2, 1, 0xe3, 5, 2, 3, 0xe2, 0, 0, 1, 0xe2, 1, 1, 2, 0xe2, 2, 3, 2, 0xe2, 5, 1, 6, 0xe2, 2, 0, 6})
	// accesses at huge and negative offsets (overflow, out of range).
	f.Add([]byte{0xe0, 0, 5, 3, 0x10, 9, 0xe1, 0, 0x85, 3, 0x10, 0xe1, 0, 0, 0, 0x7f, 0xe0, 0, 4, 1, 8, 9})
	f.Fuzz(func(t *testing.T, data []byte) {
		e := newEngine(t)
		defer e.close()
		fzRun(e, &input{b: data}, 40)
	})
}

// TestArenaOpsRandom runs the fuzz engine on pseudo-random input, so plain go
// test covers it without -fuzz.
func TestArenaOpsRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	total := map[string]*[2]int{}
	for round := 0; round < 40; round++ {
		data := make([]byte, 800)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		e := newEngine(t)
		fzRun(e, &input{b: data}, 100)
		e.close()
		for name, c := range e.outcomes {
			if total[name] == nil {
				total[name] = new([2]int)
			}
			total[name][0] += c[0]
			total[name][1] += c[1]
		}
	}
	// The input must have exercised both outcomes of every operation.
	for _, name := range []string{"AddAnonMapping", "AddFDMapping", "RemoveMapping", "Protect", "WriteAt", "ReadAt"} {
		c := total[name]
		require.NotNil(t, c, name)
		t.Logf("%-15s %4d succeeded, %4d failed", name, c[0], c[1])
		require.Positive(t, c[0], "%s never succeeded", name)
		require.Positive(t, c[1], "%s never failed", name)
	}
	require.NotNil(t, total["BadArgument"], "no bad-argument operation ran")
	t.Logf("%-15s %4d rejected", "BadArgument", total["BadArgument"][1])
}

// fzEdgeOp is the lowest op byte that selects an edge operation (one op in
// eight on random input); lower bytes go to the model's own engine.apply.
const fzEdgeOp = 0xe0

// fzRun is engine.run with the edge operations mixed in: it applies
// operations until the input is used up or max have run, checks Mappings()
// and /proc/self/maps against the model after each, and every readable page's
// contents at the end.
func fzRun(e *engine, in *input, max int) {
	e.t.Helper()
	for i := 0; i < max && !in.empty(); i++ {
		if in.b[0] >= fzEdgeOp {
			in.next()
			e.step++
			e.fzEdge(in)
		} else {
			e.apply(in)
		}
		e.checkLayout()
	}
	e.checkData()
}

// fzEdge decodes and applies one edge operation.
func (e *engine) fzEdge(in *input) {
	e.t.Helper()
	switch in.next() % 5 {
	case 0:
		off, n := fzOffset(in), fzLength(in)
		e.fzWrite(off, n, in.next()|1)
	case 1:
		off, n := fzOffset(in), fzLength(in)
		e.fzRead(off, n)
	case 2:
		e.fzBadArgument(in)
	case 3:
		e.fzProtectExec(in)
	case 4:
		// Exactly at the end: k bytes before it, n = k-1 .. k+2 bytes long.
		k, j := int64(in.next()%64), int64(in.next()%4)-1
		off, n := e.a.Size()-k, max(k+j, 0)
		if in.next()%2 == 0 {
			e.fzWrite(off, n, in.next()|1)
		} else {
			e.fzRead(off, n)
		}
	}
}

// fzOffset decodes a byte offset for an access: around the start of the
// arena (negative included), around its end (past it included), around any
// page boundary, anywhere in it, well past it, or near the int64 limits.
func fzOffset(in *input) int64 {
	size := int64(modelPages) * page
	k, d := in.next(), int64(in.next())
	switch k % 6 {
	case 0:
		return d - 128
	case 1:
		return size - 192 + d
	case 2:
		return int64(k/6%modelPages)*page + d - 128
	case 3:
		return d*size/256 + int64(in.next())
	case 4:
		return size + d*page
	}
	if k&0x80 != 0 {
		return math.MinInt64 + d
	}
	return math.MaxInt64 - d
}

// fzLength decodes an access length: 0 to 127 bytes, or up to about four
// pages in steps of 131 bytes.
func fzLength(in *input) int64 {
	l := in.next()
	if l&0x80 == 0 {
		return int64(l)
	}
	return int64(l&0x7f) * 131
}

// fzMemfd returns the whole memfd, read with pread.
func (e *engine) fzMemfd() []byte {
	e.t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(e.fd, &st); err != nil {
		e.t.Fatal(err)
	}
	b := make([]byte, st.Size)
	if n, err := unix.Pread(e.fd, b, 0); err != nil || int64(n) != st.Size {
		e.t.Fatalf("pread of the memfd: %d bytes, %v", n, err)
	}
	return b
}

// fzWrite writes n bytes of val at off, which may lie anywhere. In-range
// writes are judged by the model (engine.write); the others must fail with
// nothing written. Either way the memfd, read with pread, must then hold val
// exactly where the write went through a shared fd page and be unchanged
// everywhere else.
func (e *engine) fzWrite(off, n int64, val byte) {
	e.t.Helper()
	size := e.a.Size()
	fd := e.fzMemfd()
	if n > 0 && off >= 0 && off <= size-n {
		var reached int64 // bytes written before the first fault, per the model
		if e.byteRangeMapped(off, n) {
			reached = e.accessible(off, n, arena.ProtWrite)
		}
		e.write(off, n, val)
		for i := off; i < off+reached; i++ {
			if pg := e.pages[i/page]; pg.mapped && !pg.anon && pg.shared {
				fd[pg.fdPage*page+i%page] = val
			}
		}
	} else {
		got, err := e.a.WriteAt(bytes.Repeat([]byte{val}, int(n)), off)
		e.expectOutside(fmt.Sprintf("WriteAt(%#x, %#x)", off, n), off, n, got, err)
	}
	if after := e.fzMemfd(); !bytes.Equal(fd, after) {
		i := 0
		for fd[i] == after[i] {
			i++
		}
		e.t.Fatalf("step %d: WriteAt(%#x, %#x): memfd byte %#x is %#x, want %#x (data written through the fd mapping does not read back through the fd)",
			e.step, off, n, i, after[i], fd[i])
	}
}

// fzRead reads n bytes at off, which may lie anywhere. Offsets from 0 to the
// size are judged by the model (engine.read, which also compares the data);
// the others must fail, or succeed empty when n is 0.
func (e *engine) fzRead(off, n int64) {
	e.t.Helper()
	if off >= 0 && off <= e.a.Size() {
		e.read(off, n)
		return
	}
	got, err := e.a.ReadAt(make([]byte, n), off)
	e.expectOutside(fmt.Sprintf("ReadAt(%#x, %#x)", off, n), off, n, got, err)
}

// expectOutside checks an access that starts outside [0, size]: it must move
// nothing, and fail as out of range (or overflowing) unless n is 0.
func (e *engine) expectOutside(op string, off, n int64, got int, err error) {
	e.t.Helper()
	switch {
	case n == 0:
		e.expect(op, err, nil)
	case off < 0:
		e.expect(op, err, []error{arena.ErrOutOfRange})
	default:
		e.expect(op, err, []error{arena.ErrOutOfRange, arena.ErrOverflow})
	}
	if got != 0 {
		e.t.Fatalf("step %d: %s moved %d bytes, want 0", e.step, op, got)
	}
}

// fzBadArgument makes a call that validation must reject with a given
// sentinel before anything is mapped; fzRun's layout check then confirms
// that nothing changed.
func (e *engine) fzBadArgument(in *input) {
	e.t.Helper()
	off := int64(in.next()%modelPages) * page
	n := int64(in.next()%4+1) * page
	kind := in.next()
	var opts []arena.Option
	if kind&0x80 != 0 {
		opts = append(opts, arena.Replace())
	}
	huge := int64(math.MaxInt64) &^ (page - 1) // a page-aligned size that overflows any offset >= one page
	var op string
	var err error
	var want []error
	switch kind % 8 {
	case 0:
		fdOff := int64(in.next()%modelPages)*page + 1 + int64(in.next())%(page-1)
		want = []error{arena.ErrUnaligned}
		if kind&0x40 != 0 {
			fdOff, want = -(fdOff&^(page-1) + page), []error{arena.ErrOutOfRange}
		}
		op = fmt.Sprintf("AddFDMapping(%#x, %#x, fd offset %#x)", off, n, fdOff)
		err = e.a.AddFDMapping(off, n, e.fd, fdOff, arena.ProtReadWrite, opts...)
	case 1:
		fd := []int{-1, 1 << 20}[in.next()%2]
		op = fmt.Sprintf("AddFDMapping(%#x, %#x, fd %d)", off, n, fd)
		err, want = e.a.AddFDMapping(off, n, fd, 0, arena.ProtRead, opts...), []error{arena.ErrBadFD}
	case 2:
		p := arena.Protection(8 << (in.next() % 4))
		op = fmt.Sprintf("AddAnonMapping(%#x, %#x, prot %#x)", off, n, int(p))
		err, want = e.a.AddAnonMapping(off, n, p, opts...), []error{arena.ErrBadProtection}
	case 3:
		op = fmt.Sprintf("AddAnonMapping(%#x, %#x, Align)", off, n)
		err, want = e.a.AddAnonMapping(off, n, arena.ProtRead, append(opts, arena.Align(page))...), []error{arena.ErrBadOption}
	case 4:
		op = fmt.Sprintf("AddFDMapping(%#x, %#x, WithProtection)", off, n)
		err, want = e.a.AddFDMapping(off, n, e.fd, 0, arena.ProtRead, append(opts, arena.WithProtection(arena.ProtRead))...), []error{arena.ErrBadOption}
	case 5:
		p := arena.Protection(8 << (in.next() % 4))
		op = fmt.Sprintf("Protect(%#x, %#x, prot %#x)", off, n, int(p))
		err, want = e.a.Protect(off, n, p), []error{arena.ErrBadProtection}
	case 6:
		op = fmt.Sprintf("AddAnonMapping(%#x, %#x)", off, huge)
		err, want = e.a.AddAnonMapping(off, huge, arena.ProtReadWrite, opts...), []error{arena.ErrOverflow, arena.ErrOutOfRange}
	case 7:
		op = fmt.Sprintf("RemoveMapping(%#x, %#x)", off, huge)
		err, want = e.a.RemoveMapping(off, huge), []error{arena.ErrOverflow, arena.ErrOutOfRange}
	}
	e.expect("BadArgument("+op+")", err, want)
}

// fzProtectExec protects a range of anonymous pages r-x or rwx. Ranges with
// fd pages are skipped (a host may forbid executable memfds), and so are
// invalid ranges, which the model's own Protect already covers.
func (e *engine) fzProtectExec(in *input) {
	e.t.Helper()
	off, n := rangeArg(in)
	prot := arena.ProtRead | arena.ProtExec
	if in.next()%2 == 0 {
		prot |= arena.ProtWrite
	}
	if len(violations(off, n)) > 0 || !e.mappedRange(off, n) {
		return
	}
	for p := off / page; p < (off+n)/page; p++ {
		if !e.pages[p].anon {
			return
		}
	}
	e.expect(fmt.Sprintf("Protect(%#x, %#x, %v)", off, n, prot), e.a.Protect(off, n, prot), nil)
	for p := off / page; p < (off+n)/page; p++ {
		e.pages[p].prot = prot
	}
}
