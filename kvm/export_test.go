package kvm

// Interrupted returns how many times a signal interrupted KVM_RUN on c and
// Run entered the guest again: the tests use it to show the retry happened.
func (c *VCPU) Interrupted() uint64 { return c.interrupted.Load() }
