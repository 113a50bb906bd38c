package guestmem_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Building guest RAM with the x86 layout, backed by a sealed memfd that a
// vhost-user device could map.
func ExampleNew() {
	m, err := guestmem.New(guestmem.X86Layout(4<<30), guestmem.WithMemfd())
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	for _, r := range m.Regions() {
		fmt.Printf("guest %v +%#x at memfd offset %#x\n", r.GPA, r.Size, r.FDOffset)
	}
	// Output:
	// guest 0x0 +0xc0000000 at memfd offset 0x0
	// guest 0x100000000 +0x40000000 at memfd offset 0xc0000000
}

// A device model reading a descriptor the guest placed in RAM: addresses come
// from the guest, so anything outside RAM is an error, never a stray access.
func ExampleMemory_ReadValue() {
	m, err := guestmem.New(guestmem.X86Layout(64 << 20))
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	type descriptor struct {
		Addr  uint64
		Len   uint32
		Flags uint16
		Next  uint16
	}
	_ = m.WriteValue(0x1000, descriptor{Addr: 0x2000, Len: 512, Flags: 1, Next: 3})

	var d descriptor
	if err := m.ReadValue(0x1000, &d); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%+v\n", d)

	err = m.ReadValue(64<<20, &d) // just past RAM
	fmt.Println(errors.Is(err, guestmem.ErrHole))
	// Output:
	// {Addr:8192 Len:512 Flags:1 Next:3}
	// true
}

// Prefaulting guest RAM in parallel before the guest runs.
func ExampleMemory_Prefault() {
	m, err := guestmem.New(guestmem.X86Layout(256 << 20))
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	err = m.Prefault(context.Background(), guestmem.PrefaultOptions{
		Progress: func(done, total uint64) {
			if done == total {
				fmt.Printf("prefaulted %d MiB\n", total>>20)
			}
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	st, _ := m.Stats()
	fmt.Println(st[0].Resident == st[0].Size)
	// Output:
	// prefaulted 256 MiB
	// true
}

// Save a guest's memory and restore it into a new Memory: only the page that
// was written travels.
func ExampleMemory_Save() {
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 64 << 20}})
	if err != nil {
		panic(err)
	}
	defer m.Close()
	if err := m.WriteUint64(0x1000, 42); err != nil {
		panic(err)
	}
	var snap bytes.Buffer
	st, err := m.Save(context.Background(), &snap, guestmem.SaveOptions{})
	if err != nil {
		panic(err)
	}
	r, err := guestmem.Restore(context.Background(), []io.Reader{&snap})
	if err != nil {
		panic(err)
	}
	defer r.Close()
	v, _ := r.ReadUint64(0x1000)
	fmt.Println("data saved:", st.DataBytes, "bytes; restored value:", v)
	// Output: data saved: 4096 bytes; restored value: 42
}

// Hot-add a region, write into it, give part of it back to the host, and
// remove it.
func ExampleMemory_AddRegion() {
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 2 << 20}}, guestmem.WithMemfd(),
		guestmem.WithHotplug(8<<20))
	if err != nil {
		panic(err)
	}
	defer m.Close()
	r, err := m.AddRegion(guestmem.RegionSpec{GPA: 1 << 32, Size: 8 << 20})
	if err != nil {
		panic(err)
	}
	_ = m.WriteUint64(r.GPA, 7)
	_ = m.Discard(r.GPA, 4096) // balloon: the page is freed and reads zero
	v, _ := m.ReadUint64(r.GPA)
	fmt.Println(len(m.Regions()), "regions; after discard:", v)
	_ = m.RemoveRegion(r.GPA)
	_, err = m.ReadUint64(r.GPA)
	fmt.Println(errors.Is(err, guestmem.ErrHole))
	// Output:
	// 2 regions; after discard: 0
	// true
}

// RestoreOnDemand returns guest memory before reading its data: pages
// arrive when touched (by a vCPU, or here by the host) and in the
// background, and Wait says when all are in.
func ExampleRestoreOnDemand() {
	ctx := context.Background()
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 16 << 20}})
	if err != nil {
		log.Fatal(err)
	}
	if err := m.WriteUint64(0x1000, 42); err != nil {
		log.Fatal(err)
	}
	var snap bytes.Buffer
	if _, err := m.Save(ctx, &snap, guestmem.SaveOptions{}); err != nil {
		log.Fatal(err)
	}
	m.Close()

	r, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(snap.Bytes())},
		guestmem.OnDemandOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	v, err := r.ReadUint64(0x1000) // fetched now if the fillers have not got there
	if err != nil {
		log.Fatal(err)
	}
	if err := od.Wait(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println(v, od.Progress().Done)
	// Output: 42 true
}

// Migrate sends guest memory to ReceiveMigration over connections while the
// guest runs; here both ends are in one process, over loopback TCP, and the
// "guest" is paused by a no-op.
func ExampleMemory_Migrate() {
	ctx := context.Background()
	src, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 8 << 20}})
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	if err := src.WriteUint64(0x2000, 7); err != nil {
		log.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	received := make(chan *guestmem.Memory, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			log.Fatal(err)
		}
		defer c.Close()
		m, _, err := guestmem.ReceiveMigration(ctx, []io.ReadWriter{c})
		if err != nil {
			log.Fatal(err)
		}
		received <- m
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	st, err := src.Migrate(ctx, []io.ReadWriter{c}, guestmem.MigrateOptions{
		HostWritesOnly: true, // no vCPU writes this memory
		Pause:          func(context.Context) error { return nil },
		Resume:         func() error { return nil },
	})
	if err != nil {
		log.Fatal(err)
	}
	dst := <-received
	defer dst.Close()
	v, err := dst.ReadUint64(0x2000)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(v, st.Converged)
	// Output: 7 true
}
