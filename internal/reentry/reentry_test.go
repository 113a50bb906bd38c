package reentry

import (
	"errors"
	"strings"
	"sync"
	"testing"
)

func TestCheckTellsTheHolderFromOthers(t *testing.T) {
	var g Guard
	if err := g.Check("Close"); err != nil {
		t.Fatalf("Check outside any Enter: %v", err)
	}
	g.Enter("Save")
	err := g.Check("Close")
	if !errors.Is(err, ErrReentered) || !strings.Contains(err.Error(), "Save") || !strings.Contains(err.Error(), "Close") {
		t.Fatalf("Check inside Enter = %v; want ErrReentered naming Save and Close", err)
	}
	// Another goroutine is not the holder: its call may wait.
	var other error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); other = g.Check("Close") }()
	wg.Wait()
	if other != nil {
		t.Fatalf("Check from another goroutine = %v; want nil", other)
	}
	// Nested Enters keep the outer op until the last Leave.
	g.Enter("CopyTo")
	if op, _ := g.Holding(); op != "Save" {
		t.Fatalf("nested holder = %q; want Save", op)
	}
	g.Leave()
	if _, ok := g.Holding(); !ok {
		t.Fatal("one Leave of two ended the hold")
	}
	g.Leave()
	if _, ok := g.Holding(); ok || g.n.Load() != 0 || len(g.in) != 0 {
		t.Fatalf("after the last Leave: holding, n=%d, %d entries", g.n.Load(), len(g.in))
	}
}

func TestGoroutineIdentity(t *testing.T) {
	if a, b := goroutine(), goroutine(); a != b {
		t.Fatal("one goroutine has two identities")
	}
	const n = 50
	ids := make([]uintptr, n)
	var wg, ready sync.WaitGroup
	release := make(chan struct{})
	for i := range ids {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			ids[i] = goroutine()
			ready.Done()
			<-release // all alive at once, so none can reuse another's g
		}()
	}
	ready.Wait()
	close(release)
	wg.Wait()
	seen := map[uintptr]bool{goroutine(): true}
	for _, id := range ids {
		if id == 0 || seen[id] {
			t.Fatalf("goroutine identity %#x is zero or shared", id)
		}
		seen[id] = true
	}
}

func TestGuardConcurrent(t *testing.T) {
	var g Guard
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 1000; j++ {
				g.Enter("CopyTo")
				if g.Check("Close") == nil {
					t.Error("the holder's Check passed")
					return
				}
				g.Leave()
			}
		}()
	}
	wg.Wait()
	if g.Check("Close") != nil {
		t.Fatal("a Check after every Leave failed")
	}
}

func BenchmarkCheckUnheld(b *testing.B) {
	var g Guard
	for b.Loop() {
		_ = g.Check("Close")
	}
}

func BenchmarkEnterLeave(b *testing.B) {
	var g Guard
	for b.Loop() {
		g.Enter("CopyTo")
		g.Leave()
	}
}
