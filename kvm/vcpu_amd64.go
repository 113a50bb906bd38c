package kvm

// The x86-64 vCPU state: CPUID and the register sets.

// SetHostCPUID gives the vCPU every CPUID leaf KVM supports on this host
// (KVM_GET_SUPPORTED_CPUID, then KVM_SET_CPUID2). KVM refuses long mode to a
// vCPU whose CPUID does not list it, so set this before SetSregs.
func (c *VCPU) SetHostCPUID() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return err
	}
	cpuid := &cpuid2{nent: maxCPUIDEntries}
	if err := retryErr(func() error { return getSupportedCPUID(c.vm.kvmFD.Fd(), cpuid) }); err != nil {
		return ioctlErr("KVM_GET_SUPPORTED_CPUID", err)
	}
	return ioctlErr("KVM_SET_CPUID2", retryErr(func() error { return setCPUID2(fd, cpuid) }))
}

// Regs returns the general-purpose registers.
func (c *VCPU) Regs() (Regs, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return Regs{}, err
	}
	r := new(Regs)
	if err := retryErr(func() error { return getRegs(fd, r) }); err != nil {
		return Regs{}, ioctlErr("KVM_GET_REGS", err)
	}
	return *r, nil
}

// SetRegs sets the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return err
	}
	return ioctlErr("KVM_SET_REGS", retryErr(func() error { return setRegs(fd, &r) }))
}

// Sregs returns the special registers.
func (c *VCPU) Sregs() (Sregs, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return Sregs{}, err
	}
	r := new(Sregs)
	if err := retryErr(func() error { return getSregs(fd, r) }); err != nil {
		return Sregs{}, ioctlErr("KVM_GET_SREGS", err)
	}
	return *r, nil
}

// SetSregs sets the special registers.
func (c *VCPU) SetSregs(r Sregs) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd, err := c.fd()
	if err != nil {
		return err
	}
	return ioctlErr("KVM_SET_SREGS", retryErr(func() error { return setSregs(fd, &r) }))
}
