package guestmem_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// fakeVM is a slot table with dirty logs, standing in for a VM on hosts
// without KVM: Register takes any guestmem.VM. Its "guest" writes through
// the slots' host addresses and sets the slots' dirty bits, as KVM would.
type fakeVM struct {
	mu      sync.Mutex
	max     int
	slots   map[uint32]kvm.Slot
	logs    map[uint32][]uint64
	hooks   map[int]func()
	next    int
	closing bool
	failAt  int // AddSlot call that fails (1-based); 0: none
	adds    int
}

var errFakeRefused = errors.New("fake: slot refused")

func newFakeVM(max int) *fakeVM {
	return &fakeVM{max: max, slots: map[uint32]kvm.Slot{}, logs: map[uint32][]uint64{}, hooks: map[int]func(){}}
}

func (v *fakeVM) MaxSlots() int { return v.max }

func (v *fakeVM) Slots() []kvm.Slot {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]kvm.Slot, 0, len(v.slots))
	for _, s := range v.slots {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b kvm.Slot) int { return int(a.GPA>>12) - int(b.GPA>>12) })
	return out
}

func (v *fakeVM) AddSlot(s kvm.Slot) (kvm.Slot, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closing {
		return kvm.Slot{}, kvm.ErrClosed
	}
	v.adds++
	if v.adds == v.failAt {
		return kvm.Slot{}, errFakeRefused
	}
	for id := uint32(0); int(id) < v.max; id++ {
		if _, used := v.slots[id]; !used {
			s.ID = id
			v.slots[id] = s
			v.logs[id] = make([]uint64, kvm.DirtyBitmapWords(s.Pages()))
			return s, nil
		}
	}
	return kvm.Slot{}, kvm.ErrSlotLimit
}

func (v *fakeVM) SetSlot(s kvm.Slot) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.slots[s.ID]; !ok {
		return kvm.ErrNoSlot
	}
	v.slots[s.ID] = s
	return nil
}

func (v *fakeVM) DeleteSlot(id uint32) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.slots[id]; !ok {
		return kvm.ErrNoSlot
	}
	delete(v.slots, id)
	delete(v.logs, id)
	return nil
}

func (v *fakeVM) GetDirtyLog(id uint32, bitmap []uint64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, ok := v.slots[id]
	if !ok {
		return kvm.ErrNoSlot
	}
	if s.Flags&kvm.LogDirtyPages == 0 {
		return kvm.ErrNotLogging
	}
	copy(bitmap, v.logs[id])
	clear(v.logs[id])
	return nil
}

func (v *fakeVM) OnClose(fn func()) (func(), error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closing {
		return func() {}, kvm.ErrClosed
	}
	id := v.next
	v.next++
	v.hooks[id] = fn
	return func() { v.mu.Lock(); delete(v.hooks, id); v.mu.Unlock() }, nil
}

// Close runs the hooks, as kvm.VM.Close does, then drops every slot.
func (v *fakeVM) Close() {
	v.mu.Lock()
	v.closing = true
	hooks := v.hooks
	v.hooks = nil
	v.mu.Unlock()
	for i := range len(hooks) + v.next {
		if h, ok := hooks[i]; ok {
			h()
		}
	}
	v.mu.Lock()
	clear(v.slots)
	v.mu.Unlock()
}

// guestWrite stores val at gpa through the slot's host memory, as a vCPU
// would (invisible to guestmem's own tracking), and logs the page.
func (v *fakeVM) guestWrite(t *testing.T, m *guestmem.Memory, gpa guestmem.GuestAddress, val byte) {
	t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	for id, s := range v.slots {
		if uint64(gpa) >= s.GPA && uint64(gpa) < s.End() {
			b, err := m.Slice(gpa, 1)
			require.NoError(t, err)
			require.Equal(t, s.HostAddr+uintptr(uint64(gpa)-s.GPA), hostAddr(t, m, gpa), "the slot maps the region")
			b[0] = val
			if s.Flags&kvm.LogDirtyPages != 0 {
				p := (uint64(gpa) - s.GPA) / 4096
				v.logs[id][p/64] |= 1 << (p % 64)
			}
			return
		}
	}
	t.Fatalf("guest write at %v: no slot", gpa)
}

func hostAddr(t testing.TB, m *guestmem.Memory, a guestmem.GuestAddress) uintptr {
	t.Helper()
	h, err := m.HostAddress(a)
	require.NoError(t, err)
	return h
}

func pagesOf(d *guestmem.DirtySet) []guestmem.GuestAddress {
	var out []guestmem.GuestAddress
	for s := range d.Ranges() {
		for a := s.GPA; a < s.GPA+guestmem.GuestAddress(s.Size); a += 4096 {
			out = append(out, a)
		}
	}
	return out
}

var fakeLayout = guestmem.Layout{
	{GPA: 0, Size: 4 * mib},
	{GPA: 16 * mib, Size: 2 * mib, ReadOnly: true},
	{GPA: 32 * mib, Size: 2 * mib},
}

// Register works with any guestmem.VM: each region gets a slot of its
// range and host address, read-only where the region is, dirty-logged
// while tracking; turning tracking on and off flips the writable slots.
func TestRegisterWithAnyVM(t *testing.T) {
	m := newMemory(t, fakeLayout)
	vm := newFakeVM(8)
	require.NoError(t, m.Register(vm))
	require.Equal(t, guestmem.VM(vm), m.VM())
	slots := vm.Slots()
	require.Len(t, slots, 3)
	for i, r := range m.Regions() {
		s := slots[i]
		require.Equal(t, uint64(r.GPA), s.GPA)
		require.Equal(t, r.Size, s.Size)
		require.Equal(t, r.HostAddr, s.HostAddr)
		require.Equal(t, r.ReadOnly, s.Flags&kvm.ReadOnly != 0)
		require.Zero(t, s.Flags&kvm.LogDirtyPages)
		require.Equal(t, int(s.ID), r.Slot)
		one, err := m.Region(r.GPA + 1)
		require.NoError(t, err)
		require.Equal(t, r, one)
	}
	require.NoError(t, m.StartDirtyTracking())
	for _, s := range vm.Slots() {
		require.Equal(t, s.Flags&kvm.ReadOnly == 0, s.Flags&kvm.LogDirtyPages != 0, "slot %d flags %v", s.ID, s.Flags)
	}
	require.NoError(t, m.StopDirtyTracking())
	for _, s := range vm.Slots() {
		require.Zero(t, s.Flags&kvm.LogDirtyPages)
	}
	require.ErrorIs(t, m.Register(vm), guestmem.ErrRegistered)
	require.NoError(t, m.Unregister())
	require.Empty(t, vm.Slots())
	require.Nil(t, m.VM())
	require.Equal(t, -1, m.Regions()[0].Slot)
	require.ErrorIs(t, m.Register((*fakeVM)(nil)), guestmem.ErrBadOption, "a typed nil VM is refused")
}

// A slot the VM refuses part way leaves no slot behind.
func TestRegisterIsAllOrNothing(t *testing.T) {
	m := newMemory(t, fakeLayout)
	vm := newFakeVM(8)
	vm.failAt = 3
	err := m.Register(vm)
	require.ErrorIs(t, err, errFakeRefused)
	require.Empty(t, vm.Slots())
	require.Nil(t, m.VM())
	require.Empty(t, vm.hooks, "the close hook is withdrawn")
	vm2 := newFakeVM(2)
	require.ErrorIs(t, m.Register(vm2), kvm.ErrSlotLimit, "too few slots is refused up front")
	require.Empty(t, vm2.Slots())
}

// Dirty tracking on memory that was never registered would miss a guest's
// writes through slots the VMM set up itself: collecting is an error
// naming the cause, unless the caller declares host writes only.
func TestTrackingNeedsRegistration(t *testing.T) {
	ctx := context.Background()
	m := newMemory(t, fakeLayout)
	require.NoError(t, m.StartDirtyTracking())
	require.NoError(t, m.WriteUint64(0, 1))
	_, err := m.CollectDirty()
	require.ErrorIs(t, err, guestmem.ErrNotRegistered)
	require.Contains(t, err.Error(), "HostWritesOnly")
	_, err = m.Save(ctx, io.Discard, guestmem.SaveOptions{})
	require.NoError(t, err, "a full Save needs no dirty set")
	_, err = m.Save(ctx, io.Discard, guestmem.SaveOptions{Incremental: true})
	require.ErrorIs(t, err, guestmem.ErrNotRegistered)

	// Registered later: the VM logs from then on, and collecting works.
	vm := newFakeVM(8)
	require.NoError(t, m.Register(vm))
	vm.guestWrite(t, m, 32*mib+4096, 7)
	require.NoError(t, m.WriteUint64(0, 2)) // the full Save above reset the dirty set
	d, err := m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.GuestAddress{0, 32*mib + 4096}, pagesOf(d), "host write and guest write")

	// Declared host-only: no registration needed.
	h := newMemory(t, fakeLayout)
	require.NoError(t, h.StartDirtyTracking(guestmem.HostWritesOnly()))
	require.NoError(t, h.WriteUint64(4096, 1))
	d, err = h.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.GuestAddress{4096}, pagesOf(d))
}

// Closing the VM unregisters the memory and keeps what it logged: the next
// CollectDirty and incremental Save report the guest's writes; Unregister
// keeps them too.
func TestVMCloseHarvestsTheDirtyLog(t *testing.T) {
	ctx := context.Background()
	for _, how := range []string{"vm close", "unregister"} {
		t.Run(how, func(t *testing.T) {
			m := newMemory(t, fakeLayout, guestmem.WithMemfd())
			vm := newFakeVM(8)
			require.NoError(t, m.Register(vm))
			require.NoError(t, m.StartDirtyTracking())
			var base bytes.Buffer
			_, err := m.Save(ctx, &base, guestmem.SaveOptions{})
			require.NoError(t, err)
			vm.guestWrite(t, m, 8192, 0x42)
			vm.guestWrite(t, m, 33*mib, 0x43)
			if how == "vm close" {
				vm.Close()
			} else {
				require.NoError(t, m.Unregister())
			}
			require.Nil(t, m.VM())
			require.Empty(t, vm.Slots())
			var inc bytes.Buffer
			st, err := m.Save(ctx, &inc, guestmem.SaveOptions{Incremental: true})
			require.NoError(t, err)
			require.Equal(t, uint64(2*4096), st.DataBytes, "the increment holds both guest pages")
			r, err := guestmem.Restore(ctx, []io.Reader{&base, &inc})
			require.NoError(t, err)
			defer r.Close()
			for a, want := range map[guestmem.GuestAddress]byte{8192: 0x42, 33 * mib: 0x43} {
				var b [1]byte
				_, err := r.ReadAt(b[:], int64(a))
				require.NoError(t, err)
				require.Equal(t, want, b[0], fmt.Sprintf("at %v", a))
			}
			d, err := m.CollectDirty()
			require.NoError(t, err, "collecting works after the VM is gone")
			require.Zero(t, d.Pages())
			require.NoError(t, m.StopDirtyTracking())
		})
	}
}
