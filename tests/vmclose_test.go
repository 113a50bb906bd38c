//go:build amd64

package tests

import (
	"bytes"
	"context"
	"io"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// Closing the VM acts as Unregister for memory registered with it: the
// pages the guest wrote since the last collection are harvested from KVM's
// log first, and afterwards CollectDirty, Save (full and incremental) and
// StopDirtyTracking work. Before, every one of them failed with "use of
// closed file", forever, and what KVM had logged was lost.
func TestVMCloseKeepsTheDirtyLog(t *testing.T) {
	noLeaks(t)
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: 16 * mib}, {GPA: 32 * mib, Size: 16 * mib}},
		guestmem.WithMemfd())
	require.NoError(t, m.StartDirtyTracking())
	vm, err := testenv.KVM(t).CreateVM()
	require.NoError(t, err)
	mach, err := guest.New(vm, guest.Config{})
	require.NoError(t, err)
	require.NoError(t, m.Register(vm))
	var base bytes.Buffer
	_, err = m.Save(context.Background(), &base, guestmem.SaveOptions{})
	require.NoError(t, err)

	want := []guestmem.Span{{GPA: 3 * page, Size: 2 * page}, {GPA: 32*mib + 10*page, Size: page}}
	for _, s := range want {
		fill(t, mach, uint64(s.GPA), uint64(s.GPA)+s.Size, seed)
	}
	require.NoError(t, mach.Close())
	require.NoError(t, vm.Close())
	require.Nil(t, m.VM(), "closing the VM unregistered the memory")
	r0, err := m.Region(0)
	require.NoError(t, err)
	require.Equal(t, -1, r0.Slot, "no slot after the VM closed")

	// The increment on the base holds the guest's pages, harvested at close.
	var inc bytes.Buffer
	st, err := m.Save(context.Background(), &inc, guestmem.SaveOptions{Incremental: true})
	require.NoError(t, err, "Save after the VM closed")
	require.Equal(t, uint64(3*page), st.DataBytes, "the increment holds what the guest wrote")
	r, err := guestmem.Restore(context.Background(), []io.Reader{&base, &inc})
	require.NoError(t, err)
	defer r.Close()
	for _, s := range want {
		v, err := r.ReadUint64(s.GPA)
		require.NoError(t, err)
		require.Equal(t, guest.Pattern(uint64(s.GPA), seed), v)
	}

	// Host writes are tracked still; the KVM log is gone with the VM.
	require.NoError(t, m.WriteUint64(5*mib, 1))
	d, err := m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.Span{{GPA: 5 * mib, Size: page}}, collect(d))
	require.NoError(t, m.StopDirtyTracking())
	_, err = m.Save(context.Background(), io.Discard, guestmem.SaveOptions{})
	require.NoError(t, err, "a full Save after the VM closed")

	// The memory can be registered with another VM.
	mach2 := vmWith(t, m)
	fill(t, mach2, 0, page, seed)
}

// Registering memories with one VM from several goroutines at once gives
// every region its own slot: Register allocates and sets each slot in one
// step (kvm.VM.AddSlot). With FreeSlot then SetSlot, two goroutines could
// pick the same number and one replaced the other's slot.
func TestConcurrentRegisterGetsDistinctSlots(t *testing.T) {
	noLeaks(t)
	vm := testenv.VM(t)
	const n = 8
	mems := make([]*guestmem.Memory, n)
	for i := range mems {
		base := guestmem.GuestAddress(i) * 64 * mib
		mems[i] = newMem(t, guestmem.Layout{{GPA: base, Size: 2 * mib}, {GPA: base + 8*mib, Size: 2 * mib}})
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, m := range mems {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = m.Register(vm) }()
	}
	wg.Wait()
	seen := map[uint32]guestmem.GuestAddress{}
	for i, m := range mems {
		require.NoError(t, errs[i])
		for _, r := range m.Regions() {
			require.GreaterOrEqual(t, r.Slot, 0)
			id := uint32(r.Slot)
			_, dup := seen[id]
			require.False(t, dup, "slot %d given to %v and %v", id, seen[id], r.GPA)
			seen[id] = r.GPA
			s, err := vm.Slot(id)
			require.NoError(t, err)
			require.Equal(t, uint64(r.GPA), s.GPA, "the VM's slot %d is the region's", id)
		}
	}
	require.Len(t, vm.Slots(), 2*n)
	for _, m := range mems {
		require.NoError(t, m.Unregister())
	}
	require.Empty(t, vm.Slots())
}
