package guestmem_test

import (
	"context"
	"errors"
	"fmt"
	"log"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Guest RAM bound to host node 0, prefaulted by workers running on node
// 0's CPUs; a node the host lacks is refused before anything is mapped.
func ExampleWithNUMA() {
	l := guestmem.Layout{{GPA: 0, Size: 16 << 20}}
	if _, err := guestmem.New(l, guestmem.WithNUMA(guestmem.NUMABind(63))); errors.Is(err, guestmem.ErrNUMANode) {
		fmt.Println("node 63 refused")
	}
	m, err := guestmem.New(l, guestmem.WithNUMA(guestmem.NUMABind(0)))
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	if err := m.Prefault(context.Background(), guestmem.PrefaultOptions{}); err != nil {
		log.Fatal(err)
	}
	p, err := m.NUMAPolicyAt(0)
	if err != nil {
		log.Fatal(err)
	}
	nodes, err := m.NodePages()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("policy %v, %d MiB on node 0\n", p, nodes[0]>>20)
	// Output:
	// node 63 refused
	// policy bind:0, 16 MiB on node 0
}

// Same-page merging is opt-in, and only for anonymous guest RAM: a memfd
// backing is refused, naming the limit.
func ExampleWithKSM() {
	l := guestmem.Layout{{GPA: 0, Size: 16 << 20}}
	m, err := guestmem.New(l, guestmem.WithKSM())
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	_, err = guestmem.New(l, guestmem.WithMemfd(), guestmem.WithKSM())
	fmt.Println(errors.Is(err, guestmem.ErrBacking))
	// Output:
	// true
}
