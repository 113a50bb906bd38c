package kvm

// Interrupted returns how many times a signal interrupted KVM_RUN on c and
// Run entered the guest again: the tests use it to show the retry happened.
func (c *VCPU) Interrupted() uint64 { return c.interrupted.Load() }

// Generation and SlotAtSince expose the slot-table generation Run uses to
// tell a memory fault from an exit that raced with a slot's insertion.
func (vm *VM) Generation() uint64 { return vm.generation() }

func (vm *VM) SlotAtSince(gpa, gen uint64) (Slot, bool) { return vm.slotAtSince(gpa, gen) }
