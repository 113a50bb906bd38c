package guestmem

import (
	"errors"
	"fmt"
	"slices"

	"github.com/gmem-vmm/gmem/kvm"
)

// ErrRegistered is returned by Register on memory already registered, and
// ErrNotRegistered by Unregister on memory that is not.
var (
	ErrRegistered    = errors.New("guestmem: already registered with a VM")
	ErrNotRegistered = errors.New("guestmem: not registered with a VM")
)

type registration struct {
	vm *kvm.VM
}

func (m *Memory) slotFor(r Region) kvm.Slot {
	s := kvm.Slot{ID: uint32(r.slot), GPA: uint64(r.GPA), Size: r.Size, HostAddr: r.HostAddr}
	if r.ReadOnly {
		s.Flags |= kvm.ReadOnly
	} else if m.tracking {
		s.Flags |= kvm.LogDirtyPages
	}
	return s
}

// Register gives every region a KVM memory slot in vm, read-only for
// read-only regions and dirty-logged while dirty tracking is on. It is all
// or nothing: too few free slots (kvm.ErrSlotLimit), a closed VM
// (kvm.ErrClosed) or a slot the kernel refuses leaves no slot behind and
// the Memory unregistered. Registering twice is ErrRegistered.
func (m *Memory) Register(vm *kvm.VM) error {
	if err := m.lock("Register", true); err != nil {
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
	if vm == nil {
		return fmt.Errorf("guestmem: Register: nil VM: %w", ErrBadOption)
	}
	if free := vm.MaxSlots() - len(vm.Slots()); free < len(t.regions) {
		return fmt.Errorf("guestmem: Register: %d regions but the VM has %d free memory slots: %w",
			len(t.regions), free, kvm.ErrSlotLimit)
	}
	regions := slices.Clone(t.regions)
	undo := func(n int) error {
		var errs []error
		for _, r := range regions[:n] {
			errs = append(errs, vm.DeleteSlot(uint32(r.slot)))
		}
		return errors.Join(errs...)
	}
	for i := range regions {
		id, err := vm.FreeSlot()
		if err == nil {
			regions[i].slot = int(id)
			err = vm.SetSlot(m.slotFor(regions[i]))
		}
		if err != nil {
			return errors.Join(fmt.Errorf("guestmem: Register: region at %v: %w", regions[i].GPA, err), undo(i))
		}
	}
	m.reg = &registration{vm: vm}
	m.publish(&table{regions: regions})
	return nil
}

// Unregister deletes the memory's slots. Host memory stays mapped; when it
// returns, KVM no longer points at it.
func (m *Memory) Unregister() error {
	if err := m.lock("Unregister", true); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	if m.tab.Load().closed {
		return closedErr("Unregister")
	}
	if m.reg == nil {
		return fmt.Errorf("guestmem: Unregister: %w", ErrNotRegistered)
	}
	return m.unregisterLocked()
}

func (m *Memory) unregisterLocked() error {
	t := m.tab.Load()
	regions := slices.Clone(t.regions)
	var errs []error
	for i, r := range regions {
		if r.slot < 0 {
			continue
		}
		err := m.reg.vm.DeleteSlot(uint32(r.slot))
		if err != nil && !errors.Is(err, kvm.ErrClosed) {
			errs = append(errs, fmt.Errorf("guestmem: Unregister: region at %v: %w", r.GPA, err))
		}
		regions[i].slot = -1
	}
	m.reg = nil
	if !t.closed {
		m.publish(&table{regions: regions})
	}
	return errors.Join(errs...)
}

// VM returns the VM the memory is registered with, or nil.
func (m *Memory) VM() (vm *kvm.VM) {
	m.peek(func() {
		if m.reg != nil {
			vm = m.reg.vm
		}
	})
	return vm
}

// Slot returns the KVM slot of the region containing a, and whether the
// memory is registered.
func (m *Memory) Slot(a GuestAddress) (uint32, bool, error) {
	r, err := m.Region(a)
	if err != nil {
		return 0, false, err
	}
	return uint32(max(r.slot, 0)), r.slot >= 0, nil
}
