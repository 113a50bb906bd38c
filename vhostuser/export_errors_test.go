package vhostuser_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/vhostuser"
)

// Private memory cannot be shared: Export refuses it before sending
// anything, so the back end still has no regions.
func TestExportRefusesPrivateMemory(t *testing.T) {
	f, b := inProcess(t, vhostuser.BackendConfig{})
	l := guestmem.Layout{{GPA: 0, Size: 2 * mib}}

	anon := newMemory(t, l)
	_, err := vhostuser.Export(anon, f)
	require.ErrorIs(t, err, vhostuser.ErrNotShareable)
	require.Contains(t, err.Error(), "private anonymous")

	p := filepath.Join(t.TempDir(), "ram")
	require.NoError(t, os.WriteFile(p, make([]byte, guestmem.FileSize(l)), 0o600))
	file, err := os.Open(p)
	require.NoError(t, err)
	defer file.Close()
	fm := newMemory(t, l, guestmem.WithFile(file))
	_, err = vhostuser.Export(fm, f)
	require.ErrorIs(t, err, vhostuser.ErrNotShareable)
	require.Contains(t, err.Error(), "privately")

	closed, err := guestmem.New(l, guestmem.WithMemfd())
	require.NoError(t, err)
	require.NoError(t, closed.Close())
	_, err = vhostuser.Export(closed, f)
	require.ErrorIs(t, err, fs.ErrClosed)

	require.Empty(t, b.Memory().Regions())
}

// tenRegions is more than one SET_MEM_TABLE carries.
func tenRegions() guestmem.Layout {
	var l guestmem.Layout
	for i := range 10 {
		l = append(l, guestmem.RegionSpec{GPA: guestmem.GuestAddress(i) * gib, Size: 2 * mib})
	}
	return l
}

// More than 8 regions go one ADD_MEM_REG each with CONFIGURE_MEM_SLOTS,
// and are ErrTooManyRegions without it or past the back end's slots.
func TestExportManyRegions(t *testing.T) {
	m := newMemory(t, tenRegions(), guestmem.WithMemfd(), guestmem.WithHotplug(4*mib))
	f, b := inProcess(t, vhostuser.BackendConfig{})
	e, err := vhostuser.Export(m, f)
	require.NoError(t, err)
	require.Len(t, b.Memory().Regions(), 10)
	require.NoError(t, e.Close())

	f2, b2 := inProcess(t, vhostuser.BackendConfig{ProtocolFeatures: vhostuser.ProtocolReplyAck})
	_, err = vhostuser.Export(m, f2)
	require.ErrorIs(t, err, vhostuser.ErrTooManyRegions)
	require.Contains(t, err.Error(), "CONFIGURE_MEM_SLOTS")
	require.Empty(t, b2.Memory().Regions())

	f3, _ := inProcess(t, vhostuser.BackendConfig{MaxMemSlots: 10})
	e3, err := vhostuser.Export(m, f3)
	require.NoError(t, err)
	_, err = e3.AddRegion(guestmem.RegionSpec{GPA: 20 * gib, Size: 2 * mib})
	require.ErrorIs(t, err, vhostuser.ErrTooManyRegions)
	_, err = m.Region(20 * gib)
	require.ErrorIs(t, err, guestmem.ErrHole, "refused before the region was added")
	require.NoError(t, e3.Close())
}

// Without LOG_SHMFD there is no shared log to give; a closed Exporter
// refuses changes with fs.ErrClosed.
func TestDirtyLogNeedsLogShmfd(t *testing.T) {
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 2 * mib}}, guestmem.WithMemfd())
	f, _ := inProcess(t, vhostuser.BackendConfig{ProtocolFeatures: vhostuser.ProtocolReplyAck})
	e, err := vhostuser.Export(m, f)
	require.NoError(t, err)
	require.ErrorIs(t, e.EnableDirtyLog(), errors.ErrUnsupported)
	require.NoError(t, e.Close())
	require.NoError(t, e.Close())
	_, err = e.AddRegion(guestmem.RegionSpec{GPA: gib, Size: 2 * mib})
	require.ErrorIs(t, err, fs.ErrClosed)
}

// Hugetlb memory is shared like a memfd: the back end maps it at the
// hugepage-aligned offsets and sees what the VMM wrote.
func TestExportHugetlb(t *testing.T) {
	testenv.NeedHugetlbPages(t, 2)
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 2 * mib}, {GPA: gib, Size: 2 * mib}}, guestmem.WithHugetlb(2*mib))
	require.NoError(t, m.WriteUint64(gib+0x10, 0x600d))
	f, b := inProcess(t, vhostuser.BackendConfig{})
	e, err := vhostuser.Export(m, f)
	require.NoError(t, err)
	defer e.Close()
	v, err := read64(b.Memory(), gib+0x10)
	require.NoError(t, err)
	require.Equal(t, uint64(0x600d), v)
}
