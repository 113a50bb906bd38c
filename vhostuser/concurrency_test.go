package vhostuser_test

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/vhostuser"
)

// Everything documented as safe for concurrent use, at once (run under
// -race): the Exporter hot-adds and removes a region over and over while
// CollectDirty runs and other requests share the Frontend, the back end's MemoryMap is written and read by a
// device goroutine (logging each write) and its table changes under it.
// Every page the device wrote is in some collection.
func TestConcurrentHotplugDirtyAndAccess(t *testing.T) {
	m := newMemory(t, twoRegions, guestmem.WithMemfd(), guestmem.WithHotplug(64*mib))
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	f, b := inProcess(t, vhostuser.BackendConfig{})
	e, err := vhostuser.Export(m, f)
	require.NoError(t, err)
	defer func() { require.NoError(t, e.Close()) }()
	require.NoError(t, e.EnableDirtyLog())
	mm := b.Memory()

	const rounds = 40
	var wg sync.WaitGroup
	wrote := make(chan uint64, rounds*4)
	wg.Add(3)
	go func() { // hotplug, growing the log the first time
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			_, err := e.AddRegion(guestmem.RegionSpec{GPA: hotGPA, Size: 2 * mib})
			require.NoError(t, err)
			require.NoError(t, e.RemoveRegion(hotGPA))
		}
	}()
	go func() { // the device: writes through the map, and tries the hot region
		defer wg.Done()
		for i := 0; i < rounds*4; i++ {
			a := uint64(i%256)*page + uint64(i%2)*gib
			require.NoError(t, write64(mm, a, uint64(i)))
			v, err := read64(mm, a)
			require.NoError(t, err)
			require.Equal(t, uint64(i), v)
			wrote <- a
			if err := write64(mm, hotGPA, 1); err != nil {
				require.ErrorIs(t, err, vhostuser.ErrNoRegion)
			}
			_ = mm.Regions()
		}
	}()
	seen := map[uint64]bool{}
	collect := func() {
		d, err := m.CollectDirty()
		require.NoError(t, err)
		for s := range d.Ranges() {
			for p := uint64(s.GPA); p < uint64(s.GPA)+s.Size; p += page {
				seen[p] = true
			}
		}
	}
	go func() { // the VMM's own requests on the same connection
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			_ = e.Regions()
			require.NoError(t, f.SetFeatures(vhostuser.FeatureLogAll))
			reply, err := f.Call(vhostuser.GetFeatures, nil, nil, true)
			require.NoError(t, err)
			require.Len(t, reply, 8)
		}
	}()
	for i := 0; i < rounds; i++ {
		collect()
	}
	wg.Wait()
	collect()
	close(wrote)
	for a := range wrote {
		require.True(t, seen[a], "the device's write at %#x was collected", a)
	}
	require.Len(t, e.Regions(), 2)
	require.Len(t, mm.Regions(), 2)
	require.Equal(t, vhostuser.FeatureLogAll, b.Features())
}
