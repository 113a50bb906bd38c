package host_test

import (
	"context"
	"fmt"
	"log"
	"testing/fstest"

	"github.com/gmem-vmm/gmem/host"
)

// A VMM probes the host once, before guestmem.New, to choose a backing
// and to log what would make its guests cheaper.
func ExampleProbe() {
	f, err := host.Probe(context.Background(), host.Options{})
	if err != nil {
		log.Fatal(err)
	}
	const size = 4 << 30
	switch {
	case f.HugePools.Check(2<<20, size) == nil:
		fmt.Println("backing: hugetlb, 2 MiB pages") // guestmem.WithHugetlb(2 << 20)
	case f.THP.ShmemEnabled == "advise" || f.THP.ShmemEnabled == "always":
		fmt.Println("backing: memfd, with shmem hugepages") // guestmem.WithMemfd()
	default:
		fmt.Println("backing: anonymous") // guestmem's default
	}
	for _, a := range f.Advice {
		log.Printf("host (%s): %s", a.Topic, a.Text)
	}
}

// HugePools.Check says whether a guest fits in a pool before anything is
// allocated, and if not, what to set.
func ExampleHugePools_Check() {
	root := fstest.MapFS{
		"sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages":   {Data: []byte("512\n")},
		"sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages": {Data: []byte("100\n")},
	}
	pools := host.ReadHugePools(root)
	fmt.Println(pools.Check(2<<20, 128<<20))
	fmt.Println(pools.Check(2<<20, 1<<30))
	fmt.Println(pools.Check(1<<30, 1<<30))
	// Output:
	// <nil>
	// the 2MiB pool has 100 free pages of 512, and 1GiB needs 512 (echo 924 > /proc/sys/vm/nr_hugepages)
	// this host has no 1GiB hugetlb pool
}
