//go:build amd64

package vmm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/gmem-vmm/gmem/vmm"
)

// Boot a kernel with its console on stdout, run it for a minute, snapshot
// it, and run the snapshot in a new VM. examples/firstvmm is the same as a
// program; docs/vmm.md walks through it.
func Example() {
	kernel, err := os.Open(os.ExpandEnv("$HOME/.cache/gmem-kernel/vmlinux"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer kernel.Close()
	vm, err := vmm.New(vmm.Config{Kernel: kernel, Cmdline: vmm.DefaultCmdline, Size: 256 << 20, Console: os.Stdout})
	if err != nil {
		fmt.Println(err) // a *vmm.ConfigError, a boot error, no KVM, ...
		return
	}
	defer vm.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = vm.Run(ctx) // until the minute is up, or the guest resets (a *vmm.StopError)
	if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, vmm.ErrGuestStopped) {
		fmt.Println(err)
		return
	}

	var snap bytes.Buffer
	if err := vm.Save(context.Background(), &snap); err != nil {
		fmt.Println(err)
		return
	}
	vm.Close()
	vm2, err := vmm.Restore(context.Background(), &snap, vmm.Config{Console: os.Stdout})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vm2.Close()
	ctx2, cancel2 := context.WithTimeout(context.Background(), time.Minute)
	defer cancel2()
	_ = vm2.Run(ctx2) // the guest goes on where it was saved
}
