//go:build amd64

package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/kvm"
	"github.com/gmem-vmm/gmem/vmm"
)

// BootCmd is `gmem boot`: package vmm's VMM on the kernel given, with the
// guest's serial console streamed to stdout until the guest stops itself or
// Ctrl-C stops it.
type BootCmd struct {
	Kernel string `required:"" placeholder:"FILE" help:"The kernel: a vmlinux with a PVH note (boots quickest) or a bzImage."`
	Initrd string `placeholder:"FILE" help:"An initrd (initramfs) to load with the kernel."`
	// The default is vmm.DefaultCmdline (TestBootDefaults).
	Append              string `default:"console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1" placeholder:"ARGS" help:"The kernel command line (default: ${default})."`
	Size                Size   `default:"256M" placeholder:"SIZE" help:"Guest RAM, a positive multiple of 2 MiB; above 3 GiB it continues from 4 GiB (default: ${default})."`
	EmulatorWorkarounds bool   `help:"For KVM without hardware virtualization, which runs every guest instruction in its emulator: step over the instructions the emulator lacks (int3, clac, stac, fwait) and add the command-line options that keep the kernel from the others."`
	KVMPath             string `name:"kvm" default:"/dev/kvm" placeholder:"PATH" help:"KVM device (default: ${default})."`
}

// Validate checks the flags before the host is looked at (kong calls it
// while parsing, so a bad value exits 2): the size and command line as
// vmm.Config.Validate does, then that the initrd is a file with data in it
// and the kernel one the boot package can load.
func (c *BootCmd) Validate() error {
	if c.Kernel == "" {
		return nil // kong says --kernel is missing
	}
	if c.Size == 0 || c.Size%(2*MiB) != 0 {
		return fmt.Errorf("--size %v: must be a positive multiple of 2 MiB", c.Size)
	}
	cfg := c.config()
	cfg.Kernel = strings.NewReader("") // checked below
	var ce *vmm.ConfigError
	if err := cfg.Validate(); errors.As(err, &ce) {
		flag := "--append" // what else the Config holds is checked above or below
		if ce.Field == "Size" {
			flag = "--size"
		}
		return fmt.Errorf("%s: %s", flag, ce.Problem)
	}
	if c.Initrd != "" {
		st, err := os.Stat(c.Initrd)
		switch {
		case err != nil:
			return fmt.Errorf("--initrd: %w", err)
		case !st.Mode().IsRegular():
			return fmt.Errorf("--initrd %s: not a regular file", c.Initrd)
		case st.Size() == 0:
			return fmt.Errorf("--initrd %s: empty", c.Initrd)
		}
	}
	if err := checkKernel(c.Kernel); err != nil {
		return fmt.Errorf("--kernel %s: %w", c.Kernel, err)
	}
	return nil
}

// checkKernel reads the headers of the kernel at path as boot.Load will:
// an ELF file as a vmlinux for PVH, anything else as a bzImage.
func checkKernel(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var magic [4]byte
	if _, err := f.ReadAt(magic[:], 0); err == nil && string(magic[:]) == "\x7fELF" {
		_, err = boot.ParseVmlinux(f)
		return err
	}
	if _, err := boot.ParseBzImage(f); err != nil {
		return fmt.Errorf("neither a vmlinux (ELF) nor a bzImage: %w", err)
	}
	return nil
}

// config is the vmm.Config of the flags, without the files.
func (c *BootCmd) config() vmm.Config {
	cfg := vmm.Config{Cmdline: c.Append, Size: uint64(c.Size), EmulatorWorkarounds: c.EmulatorWorkarounds,
		KVMPath: c.KVMPath}
	if c.EmulatorWorkarounds {
		cfg.Cmdline = strings.TrimSpace(cfg.Cmdline + " " + vmm.EmulatorCmdline)
	}
	return cfg
}

// Run checks the host, boots the kernel and streams the console to stdout;
// what gmem boot itself says goes to stderr. On Ctrl-C (the Env's context)
// Run kicks the vCPU out of the guest, releases the VM and its memory, and
// returns errInterrupted (exit 130). A guest that stops itself (a reset, as
// after a panic with panic=-1, or a shutdown) is a success.
func (c *BootCmd) Run(env *Env) error {
	if err := checkFits(env.Root, c.Size, "--size"); err != nil {
		return err
	}
	// KVM first: without it, one line that says what to do, and nothing
	// allocated.
	d, err := kvm.Open(c.KVMPath)
	if err != nil {
		return fmt.Errorf("gmem boot needs KVM: %w", err)
	}
	d.Close()
	cfg := c.config()
	kernel, err := os.Open(c.Kernel)
	if err != nil {
		return err
	}
	defer kernel.Close()
	cfg.Kernel = kernel
	if c.Initrd != "" {
		initrd, err := os.Open(c.Initrd)
		if err != nil {
			return err
		}
		defer initrd.Close()
		st, err := initrd.Stat()
		if err != nil {
			return err
		}
		cfg.Initrd, cfg.InitrdSize = initrd, st.Size()
	}
	cfg.Console = env.Stdout

	start := time.Now()
	vm, err := vmm.New(cfg)
	if err != nil {
		return err
	}
	defer vm.Close()
	e := vm.Entry()
	fmt.Fprintf(env.Stderr, "gmem boot: %v guest, kernel at %v (%v), ready in %v; the console follows (Ctrl-C stops)\n",
		c.Size, e.Kernel.GPA, e.Protocol, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	runErr := vm.Run(env.Ctx)
	took := time.Since(start).Round(time.Millisecond)
	st := vm.Stats()
	closeErr := vm.Close()
	switch {
	case env.Ctx.Err() != nil:
		return errors.Join(fmt.Errorf("%w after %v (%d exits, %d console bytes); the guest is stopped and released",
			errInterrupted, took, st.Exits, st.ConsoleBytes), closeErr)
	case errors.Is(runErr, vmm.ErrGuestStopped):
		fmt.Fprintf(env.Stderr, "gmem boot: %v after %v (%d exits, %d console bytes); released\n", runErr, took,
			st.Exits, st.ConsoleBytes)
		return closeErr
	}
	return errors.Join(runErr, closeErr)
}
