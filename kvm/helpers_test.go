package kvm_test

import (
	"testing"

	"github.com/gmem-vmm/gmem/arena"
)

const (
	page = 4096
	mib  = 1 << 20
	gib  = 1 << 30
)

// anon maps size bytes of untouched anonymous memory for slots, unmapped
// at cleanup (after the VM's cleanup, which was registered earlier).
func anon(t testing.TB, size int64) *arena.Mapping {
	t.Helper()
	m, err := arena.NewAnon(size, arena.NoReserve())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
	})
	return m
}
