//go:build amd64

// Command firstvmm is the VMM of docs/vmm.md ("Your first VMM"): it boots a
// Linux kernel on KVM with its console on the terminal, pauses and resumes
// it, kicks it out of the guest, saves a snapshot, and restores the
// snapshot into a new VM that runs on.
//
//	go run ./examples/firstvmm -kernel ~/.cache/gmem-kernel/vmlinux
//
// The guest's serial console goes to stdout; what the VMM does goes to
// stderr. On a host without hardware virtualization add
// -emulator-workarounds.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/gmem-vmm/gmem/vmm"
)

func main() {
	kernel := flag.String("kernel", "", "the kernel: a vmlinux (booted through PVH) or a bzImage (required)")
	initrd := flag.String("initrd", "", "an initrd (initramfs) to load with the kernel")
	cmdline := flag.String("append", vmm.DefaultCmdline, "the kernel command line")
	size := flag.Uint64("size", 256, "guest RAM in MiB, a multiple of 2")
	runFor := flag.Duration("for", 30*time.Second, "how long the guest runs before the snapshot, and again after the restore")
	workarounds := flag.Bool("emulator-workarounds", false,
		"on KVM without hardware virtualization: step over the instructions its emulator lacks, and add vmm.EmulatorCmdline")
	flag.Parse()
	if *kernel == "" || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if *workarounds {
		*cmdline += " " + vmm.EmulatorCmdline
	}
	// Ctrl-C ends the run: the context kicks the vCPU out of the guest.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	err := run(ctx, *kernel, *initrd, *cmdline, *size<<20, *runFor, *workarounds)
	switch {
	case errors.Is(err, context.Canceled):
		say("interrupted; everything released")
		os.Exit(130)
	case err != nil:
		say("%v", err)
		os.Exit(1)
	}
}

func say(format string, args ...any) { fmt.Fprintf(os.Stderr, "firstvmm: "+format+"\n", args...) }

func run(ctx context.Context, kernelPath, initrdPath, cmdline string, size uint64, runFor time.Duration, workarounds bool) error {
	// 1. The machine: guest RAM, a VM with the in-kernel interrupt
	// controllers, the kernel loaded, vCPU 0 at its entry point.
	kernel, err := os.Open(kernelPath)
	if err != nil {
		return err
	}
	defer kernel.Close()
	cfg := vmm.Config{
		Kernel:              kernel,
		Cmdline:             cmdline,
		Size:                size,
		Console:             os.Stdout,
		EmulatorWorkarounds: workarounds,
	}
	if initrdPath != "" {
		initrd, err := os.Open(initrdPath)
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
	start := time.Now()
	vm, err := vmm.New(cfg)
	if err != nil {
		return err
	}
	defer vm.Close()
	e := vm.Entry()
	say("%d MiB guest, kernel at %v (%v), ready in %v", size>>20, e.Kernel.GPA, e.Protocol, time.Since(start).Round(time.Millisecond))

	// 2. Run the exit loop in a goroutine; the console streams to stdout.
	done := make(chan error, 1)
	go func() { done <- vm.Run(ctx) }()

	// 3. Halfway, pause: the vCPU leaves the guest and Run waits inside.
	// The registers can be read; then let it go on. 4. At the end, kick:
	// Run returns nil, the guest stopped where it was. A guest may stop
	// itself first (a kernel with no root file system panics, and
	// panic=-1 resets): Run then returns a *vmm.StopError, and the
	// snapshot is of the stopped guest.
	var runErr error
	select {
	case <-time.After(runFor / 2):
		if err := vm.Pause(ctx); err != nil {
			return err
		}
		regs, _ := vm.VCPU().Regs()
		say("paused at rip %#x; resuming", regs.RIP)
		vm.Resume()
		select {
		case <-time.After(runFor - runFor/2):
			vm.Kick()
			runErr = <-done
		case runErr = <-done:
		}
	case runErr = <-done:
	}
	if runErr != nil && !errors.Is(runErr, vmm.ErrGuestStopped) {
		return runErr
	}
	regs, _ := vm.VCPU().Regs()
	st := vm.Stats()
	say("stopped (%v) at rip %#x after %d exits, %d console bytes", orKicked(runErr), regs.RIP, st.Exits, st.ConsoleBytes)

	// 5. Save a snapshot, and close the VM: memory, vCPU, VM, all released.
	f, err := os.CreateTemp("", "firstvmm-*.snap")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	start = time.Now()
	if err := vm.Save(ctx, f); err != nil {
		return err
	}
	fi, _ := f.Stat()
	say("saved %d MiB to %s in %v", fi.Size()>>20, f.Name(), time.Since(start).Round(time.Millisecond))
	if err := vm.Close(); err != nil {
		return err
	}

	// 6. Restore the snapshot into a new VM and run it on: the guest goes
	// on where it was kicked.
	if _, err := f.Seek(0, 0); err != nil {
		return err
	}
	start = time.Now()
	vm2, err := vmm.Restore(ctx, f, vmm.Config{Console: os.Stdout, EmulatorWorkarounds: workarounds})
	if err != nil {
		return err
	}
	defer vm2.Close()
	say("restored in %v; running on for %v", time.Since(start).Round(time.Millisecond), runFor)
	rctx, cancel := context.WithTimeout(ctx, runFor)
	defer cancel()
	err = vm2.Run(rctx)
	if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, vmm.ErrGuestStopped) {
		return err
	}
	say("the restored guest ran on (%v); done", orKicked(err))
	return vm2.Close()
}

func orKicked(err error) any {
	if err == nil {
		return "kicked"
	}
	return err
}
