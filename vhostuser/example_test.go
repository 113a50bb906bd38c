package vhostuser_test

import (
	"fmt"
	"log"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/vhostuser"
)

// A VMM exports guest memory to a device back end, which reads what the
// VMM wrote and writes a reply; the back end's write shows in CollectDirty
// through the shared log. The back end runs in a goroutine here; in real
// use it is another process at the socket's other end.
func Example() {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		log.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "vhost-user")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			log.Fatal(err)
		}
		return c.(*net.UnixConn)
	}

	// The device back end.
	backend := vhostuser.NewBackend(conn(fds[1]), vhostuser.BackendConfig{})
	defer backend.Close()
	served := make(chan error, 1)
	go func() { served <- backend.Serve() }()

	// The VMM: guest RAM in a memfd, so another process can map it.
	mem, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 2 << 20}}, guestmem.WithMemfd())
	if err != nil {
		log.Fatal(err)
	}
	defer mem.Close()
	if _, err := mem.WriteAt([]byte("ping"), 0x1000); err != nil {
		log.Fatal(err)
	}
	if err := mem.StartDirtyTracking(guestmem.HostWritesOnly()); err != nil {
		log.Fatal(err)
	}
	front, err := vhostuser.NewFrontend(conn(fds[0]))
	if err != nil {
		log.Fatal(err)
	}
	exp, err := vhostuser.Export(mem, front) // SET_MEM_TABLE
	if err != nil {
		log.Fatal(err)
	}
	if err := exp.EnableDirtyLog(); err != nil { // SET_LOG_BASE
		log.Fatal(err)
	}

	// The device reads the VMM's bytes and writes its reply, logged.
	buf := make([]byte, 4)
	if _, err := backend.Memory().ReadAt(buf, 0x1000); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("back end read %q\n", buf)
	if _, err := backend.Memory().WriteAt([]byte("pong"), 0x3000); err != nil {
		log.Fatal(err)
	}

	if _, err := mem.ReadAt(buf, 0x3000); err != nil {
		log.Fatal(err)
	}
	dirty, err := mem.CollectDirty()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("VMM read %q; dirty:", buf)
	for s := range dirty.Ranges() {
		fmt.Printf(" [%v, +%#x)", s.GPA, s.Size)
	}
	fmt.Println()

	exp.Close()
	front.Close()
	fmt.Println("back end done:", <-served)
	// Output:
	// back end read "ping"
	// VMM read "pong"; dirty: [0x3000, +0x1000)
	// back end done: <nil>
}
