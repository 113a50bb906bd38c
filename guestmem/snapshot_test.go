package guestmem_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// snapLayout has a hole, a read-only region and regions of odd sizes.
var snapLayout = guestmem.Layout{
	{GPA: 0, Size: 8 * mib},
	{GPA: 16 * mib, Size: 4*mib + 4096*3},
	{GPA: 32 * mib, Size: 2 * mib, ReadOnly: true},
}

// scribble writes a pattern into some pages of every region (the first
// quadword of every 7th page, a whole page here and there) and returns the
// set of pages it wrote.
func scribble(t testing.TB, m *guestmem.Memory, seed uint64) map[guestmem.GuestAddress]bool {
	t.Helper()
	pages := map[guestmem.GuestAddress]bool{}
	for _, r := range m.Regions() {
		for off := uint64(0); off < r.Size; off += 7 * 4096 {
			a := r.GPA + guestmem.GuestAddress(off)
			require.NoError(t, m.WriteUint64(a+8, uint64(a)^seed|1))
			pages[a] = true
		}
		full := bytes.Repeat([]byte{byte(seed) | 1}, 4096)
		_, err := m.WriteAt(full, int64(r.GPA)+int64(r.Size)-4096)
		require.NoError(t, err)
		pages[r.GPA+guestmem.GuestAddress(r.Size-4096)] = true
	}
	return pages
}

// image returns every byte of guest RAM, region by region.
func image(t testing.TB, m *guestmem.Memory) []byte {
	t.Helper()
	var out []byte
	for _, r := range m.Regions() {
		b := make([]byte, r.Size)
		_, err := m.ReadAt(b, int64(r.GPA))
		require.NoError(t, err)
		out = append(out, b...)
	}
	return out
}

func save(t testing.TB, m *guestmem.Memory, inc bool) ([]byte, guestmem.SaveStats) {
	t.Helper()
	var buf bytes.Buffer
	st, err := m.Save(context.Background(), &buf, guestmem.SaveOptions{Incremental: inc})
	require.NoError(t, err)
	require.Equal(t, int64(buf.Len()), st.Bytes)
	return buf.Bytes(), st
}

func writeFile(t testing.TB, b []byte) *os.File {
	t.Helper()
	p := filepath.Join(t.TempDir(), "snap")
	require.NoError(t, os.WriteFile(p, b, 0o600))
	f, err := os.Open(p)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

func TestSnapshotRoundTrip(t *testing.T) {
	for _, backing := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		t.Run(backing.String(), func(t *testing.T) {
			m := newMemory(t, snapLayout, withBacking(backing))
			pages := scribble(t, m, 0xabc)
			want := image(t, m)
			snap, st := save(t, m, false)
			// Only what was written is saved: holes and zero pages are skipped.
			require.Equal(t, uint64(len(pages))*4096, st.DataBytes)
			require.Less(t, len(snap), len(pages)*4096+64*4096, "the stream holds data, not all of RAM")

			info, err := guestmem.Verify(context.Background(), bytes.NewReader(snap))
			require.NoError(t, err)
			require.Equal(t, st.ID, info.ID)
			require.Equal(t, st.DataBytes, info.DataBytes)
			require.Len(t, info.Layout, len(snapLayout))

			for _, into := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
				r, err := guestmem.Restore(context.Background(), []io.Reader{bytes.NewReader(snap)},
					withBacking(into))
				require.NoError(t, err)
				require.Equal(t, m.Regions()[1].GPA, r.Regions()[1].GPA)
				require.True(t, r.Regions()[2].ReadOnly)
				require.True(t, bytes.Equal(want, image(t, r)), "eager restore into %v", into)
				require.NoError(t, r.Close())
			}

			f := writeFile(t, snap)
			sum := sha256.Sum256(snap)
			l, err := guestmem.RestoreLazy(context.Background(), []*os.File{f})
			require.NoError(t, err)
			require.True(t, bytes.Equal(want, image(t, l)), "lazy restore")
			// Writes go to private copies: the file is never modified.
			scribble(t, l, 0x999)
			require.NoError(t, l.Discard(0, 8*mib))
			z := make([]byte, 8*mib)
			_, err = l.ReadAt(z, 0)
			require.NoError(t, err)
			require.Equal(t, make([]byte, 8*mib), z, "Discard on a lazily restored range reads zeros, not the file")
			require.NoError(t, l.Close())
			got, err := os.ReadFile(f.Name())
			require.NoError(t, err)
			require.Equal(t, sum, sha256.Sum256(got))
		})
	}
}

func TestSnapshotIncremental(t *testing.T) {
	m := newMemory(t, snapLayout, guestmem.WithMemfd(), guestmem.WithHotplug(4*mib))
	scribble(t, m, 0x1)
	_, err := m.Save(context.Background(), &bytes.Buffer{}, guestmem.SaveOptions{Incremental: true})
	require.ErrorIs(t, err, guestmem.ErrNeedFullSave, "no earlier save")

	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	base, _ := save(t, m, false)
	// Change some pages, zero others.
	require.NoError(t, m.WriteUint64(4096*3, 0xfeed))
	require.NoError(t, m.WriteUint64(16*mib+4096*9, 0xbeef))
	require.NoError(t, m.Discard(7*4096, 4096)) // was data in the base
	want := image(t, m)
	inc, st := save(t, m, true)
	require.True(t, st.Incremental)
	require.Equal(t, uint64(2*4096), st.DataBytes, "only the two written pages")
	require.Equal(t, uint64(4096), st.ZeroBytes, "the discarded page is a zero record")

	// A second increment after more writes.
	require.NoError(t, m.WriteUint64(5*4096, 0xcafe))
	want2 := image(t, m)
	inc2, _ := save(t, m, true)

	r, err := guestmem.Restore(context.Background(), []io.Reader{bytes.NewReader(base), bytes.NewReader(inc)})
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, image(t, r)))
	require.NoError(t, r.Close())
	r, err = guestmem.Restore(context.Background(),
		[]io.Reader{bytes.NewReader(base), bytes.NewReader(inc), bytes.NewReader(inc2)})
	require.NoError(t, err)
	require.True(t, bytes.Equal(want2, image(t, r)))
	require.NoError(t, r.Close())
	l, err := guestmem.RestoreLazy(context.Background(), []*os.File{writeFile(t, base), writeFile(t, inc), writeFile(t, inc2)})
	require.NoError(t, err)
	require.True(t, bytes.Equal(want2, image(t, l)))
	require.NoError(t, l.Close())

	// Out of order or on the wrong base: a chain error, no memory.
	for name, chain := range map[string][]io.Reader{
		"increment first":    {bytes.NewReader(inc)},
		"skipping a link":    {bytes.NewReader(base), bytes.NewReader(inc2)},
		"two full snapshots": {bytes.NewReader(base), bytes.NewReader(base)},
	} {
		r, err := guestmem.Restore(context.Background(), chain)
		require.ErrorIs(t, err, guestmem.ErrSnapshotChain, name)
		require.Nil(t, r)
	}

	// Hotplug changes the layout: the next save must be full.
	_, err = m.AddRegion(guestmem.RegionSpec{GPA: 64 * mib, Size: 2 * mib})
	require.NoError(t, err)
	_, err = m.Save(context.Background(), &bytes.Buffer{}, guestmem.SaveOptions{Incremental: true})
	require.ErrorIs(t, err, guestmem.ErrNeedFullSave)
	// Tracking off and on again: also full.
	save(t, m, false)
	require.NoError(t, m.StopDirtyTracking())
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	_, err = m.Save(context.Background(), &bytes.Buffer{}, guestmem.SaveOptions{Incremental: true})
	require.ErrorIs(t, err, guestmem.ErrNeedFullSave)
}

func TestSnapshotCorruption(t *testing.T) {
	m := newMemory(t, snapLayout)
	scribble(t, m, 0x77)
	snap, _ := save(t, m, false)
	mapsBefore, fdsBefore := testenv.GuestMappings(t), testenv.OpenFDs(t)

	restore := func(b []byte) error {
		r, err := guestmem.Restore(context.Background(), []io.Reader{bytes.NewReader(b)})
		require.Nil(t, r, "nothing half-restored is returned")
		return err
	}
	// Every truncation: at each block boundary and inside payloads.
	for cut := 0; cut < len(snap); cut += 4096 / 2 {
		err := restore(snap[:cut])
		require.ErrorIs(t, err, guestmem.ErrSnapshotTruncated, "cut at %d", cut)
		var se *guestmem.SnapshotError
		require.ErrorAs(t, err, &se)
	}
	flip := func(at int) []byte {
		b := bytes.Clone(snap)
		b[at] ^= 0x40
		return b
	}
	require.ErrorIs(t, restore(flip(100)), guestmem.ErrSnapshotChecksum, "region table")
	require.ErrorIs(t, restore(flip(4096+40)), guestmem.ErrSnapshotChecksum, "index block")
	require.ErrorIs(t, restore(flip(2*4096+8)), guestmem.ErrSnapshotChecksum, "payload")
	require.ErrorIs(t, restore(flip(0)), guestmem.ErrSnapshotFormat, "magic")
	require.ErrorIs(t, restore([]byte(strings.Repeat("x", 8192))), guestmem.ErrSnapshotFormat)
	v3 := bytes.Clone(snap)
	binary.LittleEndian.PutUint32(v3[8:], 3)
	require.ErrorIs(t, restore(v3), guestmem.ErrSnapshotVersion)
	// A record outside the layout, with valid checksums: a layout error.
	bad := bytes.Clone(snap)
	binary.LittleEndian.PutUint64(bad[4096+32:], 12*mib) // first record's address, in the hole
	binary.LittleEndian.PutUint32(bad[4096+12:], blockCRC(bad[4096:8192], 12))
	require.ErrorIs(t, restore(bad), guestmem.ErrSnapshotLayout)
	// A record whose range wraps around the address space: a layout error
	// for Verify as for Restore, never an access.
	wrap := bytes.Clone(snap)
	binary.LittleEndian.PutUint64(wrap[4096+32:], ^uint64(0)-4095)
	binary.LittleEndian.PutUint32(wrap[4096+12:], blockCRC(wrap[4096:8192], 12))
	require.ErrorIs(t, restore(wrap), guestmem.ErrSnapshotLayout)
	_, err := guestmem.Verify(context.Background(), bytes.NewReader(wrap))
	require.ErrorIs(t, err, guestmem.ErrSnapshotLayout)

	// The VMM expects another memory map: a layout error, no memory.
	other := guestmem.Layout{{GPA: 0, Size: 8 * mib}}
	r, err := guestmem.Restore(context.Background(), []io.Reader{bytes.NewReader(snap)}, guestmem.WithLayout(other))
	require.ErrorIs(t, err, guestmem.ErrSnapshotLayout)
	require.Nil(t, r)
	l, err := guestmem.RestoreLazy(context.Background(), []*os.File{writeFile(t, snap)}, guestmem.WithLayout(other))
	require.ErrorIs(t, err, guestmem.ErrSnapshotLayout)
	require.Nil(t, l)
	reversed := guestmem.Layout{snapLayout[2], snapLayout[1], snapLayout[0]}
	r, err = guestmem.Restore(context.Background(), []io.Reader{bytes.NewReader(snap)}, guestmem.WithLayout(reversed))
	require.NoError(t, err, "the expected layout may be given in any order")
	require.NoError(t, r.Close())

	_, err = guestmem.Verify(context.Background(), bytes.NewReader(flip(2*4096+8)))
	require.ErrorIs(t, err, guestmem.ErrSnapshotChecksum)
	_, err = guestmem.RestoreLazy(context.Background(), []*os.File{writeFile(t, snap[:len(snap)-100])})
	require.ErrorIs(t, err, guestmem.ErrSnapshotTruncated)
	require.Equal(t, mapsBefore, testenv.GuestMappings(t), "failed restores leave no guest mapping behind")
	require.Equal(t, fdsBefore+2, testenv.OpenFDs(t), "nor an fd (the +2 are the files the test opened)")
}

func blockCRC(b []byte, off int) uint32 {
	c := bytes.Clone(b)
	copy(c[off:], []byte{0, 0, 0, 0})
	return crc32.Checksum(c, crc32.MakeTable(crc32.Castagnoli))
}
