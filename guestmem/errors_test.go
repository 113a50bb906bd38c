package guestmem_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// oneVoice checks the message rule: one "guestmem: " prefix, at the start,
// and no arena prefix or arena offsets: callers read guest terms.
func oneVoice(t *testing.T, what string, err error) {
	t.Helper()
	require.Error(t, err, what)
	msg := err.Error()
	require.True(t, strings.HasPrefix(msg, "guestmem: "), "%s: %q starts with the package", what, msg)
	require.Equal(t, 1, strings.Count(msg, "guestmem: "), "%s: %q names the package once", what, msg)
	require.NotContains(t, msg, "arena: ", "%s: %q", what, msg)
	require.NotContains(t, msg, "-byte mapping", "%s: %q speaks of arena offsets", what, msg)
}

// atGPA checks that err is an *AddressError naming gpa.
func atGPA(t *testing.T, what string, err error, gpa guestmem.GuestAddress, sentinel error) {
	t.Helper()
	oneVoice(t, what, err)
	var ae *guestmem.AddressError
	require.True(t, errors.As(err, &ae), "%s: %v is an *AddressError", what, err)
	require.Equal(t, gpa, ae.GPA, "%s: %v", what, err)
	require.ErrorIs(t, err, sentinel, what)
	require.Contains(t, err.Error(), gpa.String(), what)
}

// Every error from guestmem speaks in guest terms: the guest-physical
// address, one package prefix; sentinels of the arena it passes on match
// both guestmem's re-export and the arena's own.
func TestErrorsAreInGuestTerms(t *testing.T) {
	ctx := context.Background()
	m := newMemory(t, twoRegions, guestmem.WithMemfd())

	_, err := m.LoadUint64(4*mib + 3)
	atGPA(t, "misaligned atomic", err, 4*mib+3, guestmem.ErrUnaligned)
	require.ErrorIs(t, err, arena.ErrUnaligned)
	_, err = m.CompareAndSwapUint32(16*mib+2, 0, 1)
	atGPA(t, "misaligned CAS", err, 16*mib+2, guestmem.ErrUnaligned)
	_, err = m.ReadUint64(6 * mib)
	atGPA(t, "read in a hole", err, 6*mib, guestmem.ErrHole)
	err = m.Prefetch(guestmem.Span{GPA: 5 * mib, Size: 2 * mib})
	atGPA(t, "policy across a hole", err, 6*mib, guestmem.ErrHole)
	err = m.LockOnFault(guestmem.Span{GPA: 4096 + 1, Size: 4096})
	atGPA(t, "unaligned span", err, 4097, guestmem.ErrUnaligned)
	err = m.Discard(18*mib, 4096)
	atGPA(t, "discard in a hole", err, 18*mib, guestmem.ErrHole)
	require.NoError(t, m.LockOnFault(guestmem.Span{GPA: 4 * mib, Size: 2 * mib}))
	require.NoError(t, m.WriteUint64(4*mib, 1))
	err = m.Discard(4*mib, 4096)
	atGPA(t, "discard of locked pages", err, 4*mib, guestmem.ErrLocked)
	require.ErrorIs(t, m.DropPageCache(guestmem.Span{GPA: 4 * mib, Size: 4096}), arena.ErrLocked)
	oneVoice(t, "drop of locked pages", m.DropPageCache(guestmem.Span{GPA: 4 * mib, Size: 4096}))
	require.NoError(t, m.Unlock())

	failing := &failingWriter{limit: 100}
	_, err = m.CopyTo(failing, 4096, 8192)
	atGPA(t, "a failing writer", err, 4096+100, errWriter)

	oneVoice(t, "no tracking", func() error { _, err := m.CollectDirty(); return err }())
	_, err = m.AddRegion(guestmem.RegionSpec{GPA: 0, Size: 2 * mib})
	oneVoice(t, "hot-add over a region", err)
	oneVoice(t, "remove no region", m.RemoveRegion(3*mib))
	_, err = m.Save(ctx, failing, guestmem.SaveOptions{Incremental: true})
	oneVoice(t, "increment without base", err)
	_, err = m.Save(ctx, &failingWriter{limit: 5000}, guestmem.SaveOptions{})
	oneVoice(t, "save to a failing writer", err)
	require.ErrorIs(t, err, errWriter)

	// New and Restore.
	for what, l := range map[string]guestmem.Layout{
		"empty layout": {},
		"zero region":  {{GPA: 0, Size: 0}},
		"overlap":      {{GPA: 0, Size: 2 * mib}, {GPA: mib, Size: 2 * mib}},
	} {
		_, err := guestmem.New(l)
		oneVoice(t, what, err)
	}
	_, err = guestmem.New(twoRegions, guestmem.WithHugetlb(3))
	oneVoice(t, "bad hugetlb size", err)
	_, err = guestmem.New(twoRegions, guestmem.WithFile(nil))
	oneVoice(t, "File without a file", err)
	_, err = guestmem.Restore(ctx, []io.Reader{strings.NewReader("not a snapshot")})
	oneVoice(t, "restore of garbage", err)
	var snap bytes.Buffer
	_, err = m.Save(ctx, &snap, guestmem.SaveOptions{})
	require.NoError(t, err)
	_, err = guestmem.Restore(ctx, []io.Reader{bytes.NewReader(snap.Bytes())}, guestmem.WithHugetlb(3))
	oneVoice(t, "restore into a bad backing", err)
	_, err = guestmem.Restore(ctx, []io.Reader{bytes.NewReader(snap.Bytes())},
		guestmem.WithLayout(guestmem.Layout{{GPA: 0, Size: 2 * mib}}))
	oneVoice(t, "restore of another layout", err)
	_, err = guestmem.RestoreLazy(ctx, []*os.File{writeFile(t, snap.Bytes()[:8192])})
	oneVoice(t, "lazy restore of a truncated file", err)

	require.NoError(t, m.Close())
	_, err = m.ReadUint64(0)
	oneVoice(t, "closed", err)
	require.ErrorIs(t, err, guestmem.ErrClosed)
}

// A fault part way — a page of a File backing past the end of its truncated
// file — names the guest address of the faulting page.
func TestFaultNamesTheGuestAddress(t *testing.T) {
	l := guestmem.Layout{{GPA: 0, Size: 2 * mib}, {GPA: 16 * mib, Size: 2 * mib}}
	f := writeFile(t, make([]byte, guestmem.FileSize(l)))
	m := newMemory(t, l, guestmem.WithFile(f))
	require.NoError(t, os.Truncate(f.Name(), 2*mib+8192)) // region 1 keeps two pages
	buf := make([]byte, 4*4096)
	n, err := m.ReadAt(buf, 16*mib)
	atGPA(t, "read past the file's end", err, 16*mib+8192, guestmem.ErrFault)
	require.Equal(t, 8192, n)
	var fe *arena.FaultError
	require.True(t, errors.As(err, &fe), "the arena's fault is still there for errors.As")
	_, err = m.LoadUint64(16*mib + 3*4096)
	atGPA(t, "atomic past the file's end", err, 16*mib+3*4096, guestmem.ErrFault)
}

// Use after Close is fs.ErrClosed in every package, as for an *os.File.
func TestClosedIsFsErrClosed(t *testing.T) {
	m, err := guestmem.New(twoRegions)
	require.NoError(t, err)
	require.NoError(t, m.Close())
	_, err = m.ReadUint64(0)
	require.ErrorIs(t, err, fs.ErrClosed)
	oneVoice(t, "closed memory", err)
	a, err := arena.NewAnon(4096)
	require.NoError(t, err)
	require.NoError(t, a.Close())
	_, err = a.LoadUint64(0)
	require.ErrorIs(t, err, fs.ErrClosed)
	require.Same(t, fs.ErrClosed, guestmem.ErrClosed)
	require.Same(t, fs.ErrClosed, arena.ErrClosed)
	require.Same(t, fs.ErrClosed, kvm.ErrClosed)
}
