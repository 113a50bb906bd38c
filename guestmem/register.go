package guestmem

import (
	"errors"
	"fmt"
	"reflect"

	"github.com/gmem-vmm/gmem/kvm"
)

// ErrRegistered is returned by Register on memory already registered, and
// ErrNotRegistered by Unregister on memory that is not.
var (
	ErrRegistered    = errors.New("already registered with a VM")
	ErrNotRegistered = errors.New("not registered with a VM")
)

// VM is what Register needs of a virtual machine: its slot table, the
// dirty logs of its slots, and word when it closes. *kvm.VM implements it,
// for a VM this process created or one adopted from another library
// (kvm.Adopt); a VMM with a slot table of its own can implement it too.
// Slots are kvm.Slot values; errors should wrap kvm's sentinels
// (kvm.ErrClosed, kvm.ErrSlotLimit) where they mean the same.
type VM interface {
	// MaxSlots is the number of slot IDs, 0 to MaxSlots()-1.
	MaxSlots() int
	// Slots lists the slots in use.
	Slots() []kvm.Slot
	// AddSlot creates s under a free ID it chooses, in one step (two
	// concurrent calls never get the same ID), and returns it.
	AddSlot(s kvm.Slot) (kvm.Slot, error)
	// SetSlot changes slot s.ID (its flags: dirty logging on or off).
	SetSlot(s kvm.Slot) error
	// DeleteSlot removes slot id; when it returns, no vCPU reaches the
	// slot's memory any more.
	DeleteSlot(id uint32) error
	// GetDirtyLog copies slot id's dirty bitmap (one bit per 4 KiB page)
	// into bitmap and resets it.
	GetDirtyLog(id uint32, bitmap []uint64) error
	// OnClose registers fn to run when the VM begins to close, while the
	// calls above still work; it fails once closing has begun.
	OnClose(fn func()) (cancel func(), err error)
}

var _ VM = (*kvm.VM)(nil)

// registration is the VM the memory is registered with and the slot of each
// region, by the region's GPA. It is guarded by m.wmu (the region table
// holds no slot numbers, so registering never replaces it).
type registration struct {
	vm     VM
	slots  map[GuestAddress]uint32
	cancel func() // unregisters the VM's close hook
}

// slot returns the slot of the region at gpa, if it has one.
func (g *registration) slot(gpa GuestAddress) (uint32, bool) {
	if g == nil {
		return 0, false
	}
	id, ok := g.slots[gpa]
	return id, ok
}

func (m *Memory) slotFor(r region, id uint32) kvm.Slot {
	s := kvm.Slot{ID: id, GPA: uint64(r.GPA), Size: r.Size, HostAddr: r.HostAddr}
	if m.gmem != nil {
		// KVM takes the pages from the guest_memfd; HostAddr maps the same
		// bytes, for its instruction emulator. Never logged or read-only.
		s.GuestMemfd, s.GuestMemfdOffset = m.gmem, uint64(r.FDOffset)
		return s
	}
	if r.ReadOnly {
		s.Flags |= kvm.ReadOnly
	} else if m.tracking {
		s.Flags |= kvm.LogDirtyPages
	}
	return s
}

// addSlot gives region r a slot of the registration's VM.
func (m *Memory) addSlot(r region) error {
	s, err := m.reg.vm.AddSlot(m.slotFor(r, 0))
	if err != nil {
		return err
	}
	m.reg.slots[r.GPA] = s.ID
	return nil
}

// Register gives every region a KVM memory slot in vm, read-only for
// read-only regions and dirty-logged while dirty tracking is on. It is all
// or nothing: too few free slots (kvm.ErrSlotLimit), a closed VM
// (kvm.ErrClosed) or a slot the kernel refuses leaves no slot behind and
// the Memory unregistered. Registering twice is ErrRegistered. Closing vm
// later acts as Unregister: the memory harvests the VM's last dirty log and
// lets go of it first (kvm.VM.OnClose), so CollectDirty and Save keep
// working and report what the guest wrote.
func (m *Memory) Register(vm VM) error {
	if err := m.lock("Register", false); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	t := m.tab.Load()
	if t.closed {
		return closedErr("Register")
	}
	if m.reg != nil {
		return fmt.Errorf("guestmem: Register: %w", ErrRegistered)
	}
	if vm == nil || reflect.ValueOf(vm).Kind() == reflect.Pointer && reflect.ValueOf(vm).IsNil() {
		return fmt.Errorf("guestmem: Register: nil VM: %w", ErrBadOption)
	}
	if m.gmem != nil {
		if kv, ok := vm.(*kvm.VM); !ok || kv != m.gmem.VM() {
			return fmt.Errorf("guestmem: Register: %w: the guest_memfd was created on another VM, and KVM binds it "+
				"to that one (register with the VM given to WithGuestMemfd)", ErrGuestMemfdLimit)
		}
		if m.tracking {
			return fmt.Errorf("guestmem: Register: %w: dirty tracking is on, and KVM keeps no dirty log of "+
				"guest_memfd slots (KVM_MEM_LOG_DIRTY_PAGES is refused); StopDirtyTracking first", ErrGuestMemfdLimit)
		}
	}
	if free := vm.MaxSlots() - len(vm.Slots()); free < len(t.regions) {
		return fmt.Errorf("guestmem: Register: %d regions but the VM has %d free memory slots: %w",
			len(t.regions), free, kvm.ErrSlotLimit)
	}
	cancel, err := vm.OnClose(func() { m.vmClosing(vm) })
	if err != nil {
		return withOp("Register", err)
	}
	m.reg = &registration{vm: vm, slots: make(map[GuestAddress]uint32, len(t.regions)), cancel: cancel}
	for _, r := range t.regions {
		if err := m.addSlot(r); err != nil {
			err = fmt.Errorf("guestmem: Register: region at %v: %w", r.GPA, err)
			return errors.Join(err, m.dropSlots(false))
		}
	}
	if m.tracking {
		m.trackSeen = true
	}
	m.publishSlots()
	return nil
}

// Unregister deletes the memory's slots. Host memory stays mapped; when it
// returns, KVM no longer points at it. While dirty tracking is on, what
// KVM logged for the slots is kept first, for the next CollectDirty or Save.
func (m *Memory) Unregister() error {
	if err := m.lock("Unregister", false); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	if m.tab.Load().closed {
		return closedErr("Unregister")
	}
	if m.reg == nil {
		return fmt.Errorf("guestmem: Unregister: %w", ErrNotRegistered)
	}
	return m.dropSlots(true)
}

// vmClosing runs when the VM the memory is registered with begins to close
// (its OnClose hook), while the VM still works: it unregisters, keeping the
// last dirty log. From Save's writer (which holds wmu already) it runs
// without taking it.
func (m *Memory) vmClosing(vm VM) {
	m.peek(func() {
		if m.reg != nil && m.reg.vm == vm && !m.tab.Load().closed {
			// An error here has no caller to go to: the VM is closing and its
			// slots go with it. What the log held is in the dirty set
			// unless GetDirtyLog itself failed, which then shows as a slot
			// error in the next Register of this memory instead.
			_ = m.dropSlots(true)
		}
	})
}

// dropSlots deletes every slot of the registration and ends it; with harvest
// set and tracking on, each writable slot's dirty log is merged into the
// host-side dirty bitmaps first. The caller holds m.wmu.
func (m *Memory) dropSlots(harvest bool) error {
	t := m.tab.Load()
	var errs []error
	var bitmap []uint64
	for _, r := range t.regions {
		id, ok := m.reg.slot(r.GPA)
		if !ok {
			continue
		}
		if harvest && m.tracking && !r.ReadOnly && r.dirty != nil {
			words := len(r.dirty.w)
			if cap(bitmap) < words {
				bitmap = make([]uint64, words)
			}
			bitmap = bitmap[:words]
			if err := m.reg.vm.GetDirtyLog(id, bitmap); err != nil && !errors.Is(err, kvm.ErrClosed) {
				errs = append(errs, fmt.Errorf("guestmem: Unregister: dirty log of region at %v: %w", r.GPA, err))
			} else if err == nil {
				for w, v := range bitmap {
					if v != 0 {
						r.dirty.w[w].Or(v)
					}
				}
			}
		}
		if err := m.reg.vm.DeleteSlot(id); err != nil && !errors.Is(err, kvm.ErrClosed) {
			errs = append(errs, fmt.Errorf("guestmem: Unregister: region at %v: %w", r.GPA, err))
		}
	}
	m.reg.cancel()
	m.reg = nil
	m.publishSlots()
	return errors.Join(errs...)
}

// VM returns the VM the memory is registered with, or nil.
func (m *Memory) VM() (vm VM) {
	m.peek(func() {
		if m.reg != nil {
			vm = m.reg.vm
		}
	})
	return vm
}
