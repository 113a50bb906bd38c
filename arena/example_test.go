package arena_test

import (
	"errors"
	"fmt"
	"log"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// Guest RAM backed by a memfd, mapped into an arena that leaves room for
// more: the layout crosvm uses, so another process can map the same memory.
func ExampleArena() {
	const ram = 64 << 20
	fd, err := unix.MemfdCreate("guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		log.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, ram); err != nil {
		log.Fatal(err)
	}

	a, err := arena.New(1 << 30) // reserve 1 GiB of address space; costs no memory
	if err != nil {
		log.Fatal(err)
	}
	defer a.Close()
	if err := a.AddFDMapping(0, ram, fd, 0, arena.ProtReadWrite); err != nil {
		log.Fatal(err)
	}
	if err := a.WriteUint32(0x1000, 0xcafe); err != nil {
		log.Fatal(err)
	}
	v, _ := a.ReadUint32(0x1000)
	fmt.Printf("%#x\n", v)

	// Beyond the RAM the arena is reserved: touching it is an error, not a crash.
	_, err = a.ReadUint32(ram)
	fmt.Println(errors.Is(err, arena.ErrFault), errors.Is(err, arena.ErrNotMapped))
	// Output:
	// 0xcafe
	// true true
}

// Prefaulting memory before a guest runs, so it never takes a page fault.
func ExampleMapping_Populate() {
	m, err := arena.NewAnon(16<<20, arena.Private(), arena.Align(2<<20))
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	_ = m.UseHugepages(0, m.Size()) // best effort: honoured where THP allows
	if err := m.Populate(0, m.Size(), arena.PopulateWrite); err != nil {
		log.Fatal(err)
	}
	resident, _ := m.ResidentBytes(0, m.Size())
	fmt.Println(resident == m.Size())
	// Output: true
}

// Removing part of a mapping splits it and gives the range back to the
// reservation; the pages are released.
func ExampleArena_RemoveMapping() {
	a, err := arena.New(16 << 20)
	if err != nil {
		log.Fatal(err)
	}
	defer a.Close()
	if err := a.AddAnonMapping(0, 8<<20, arena.ProtReadWrite); err != nil {
		log.Fatal(err)
	}
	if err := a.RemoveMapping(2<<20, 2<<20); err != nil {
		log.Fatal(err)
	}
	for _, mi := range a.Mappings() {
		fmt.Printf("[%#x, +%#x) %v\n", mi.Offset, mi.Size, mi.Prot)
	}
	// Output:
	// [0x0, +0x200000) rw-
	// [0x400000, +0x400000) rw-
}

// Locking guest RAM as it is touched, and the error for dropping locked pages.
func ExampleMapping_LockOnFault() {
	m, err := arena.NewAnon(1<<20, arena.Private())
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	if err := m.LockOnFault(0, m.Size()); err != nil {
		log.Fatal(err) // says RLIMIT_MEMLOCK and what was asked for when that is the cause
	}
	err = m.DropPageCache(0, m.Size())
	fmt.Println(errors.Is(err, arena.ErrLocked))
	_ = m.Unlock(0, m.Size())
	fmt.Println(m.DropPageCache(0, m.Size()))
	// Output:
	// true
	// <nil>
}

// Mapping a file: what is written through the mapping is in the file, and
// reading past the end of a file that shrank is an error, not a SIGBUS.
func ExampleNewFromFD() {
	fd, err := unix.MemfdCreate("disk-image", unix.MFD_CLOEXEC)
	if err != nil {
		log.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 2<<20); err != nil {
		log.Fatal(err)
	}
	m, err := arena.NewFromFD(fd, 0, 2<<20)
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	if _, err := m.WriteAt([]byte("hello"), 1<<20); err != nil {
		log.Fatal(err)
	}
	buf := make([]byte, 5)
	_, _ = unix.Pread(fd, buf, 1<<20)
	fmt.Println(string(buf))

	_ = unix.Ftruncate(fd, 1<<20) // someone shrinks the file under the mapping
	_, err = m.ReadAt(buf, 1<<20)
	fmt.Println(errors.Is(err, arena.ErrFault))
	// Output:
	// hello
	// true
}
