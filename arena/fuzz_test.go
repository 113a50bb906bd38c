package arena_test

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzArenaOps drives random Add/Remove/Protect/Write/Read sequences against
// the reference model in model_test.go: every result, Mappings(),
// /proc/self/maps and the memory's contents (through the arena and through
// the memfd) must agree with the model.
func FuzzArenaOps(f *testing.F) {
	f.Add([]byte{0, 0, 0, 8, 2, 3, 1})                                  // add anon over the first pages
	f.Add([]byte{1, 0, 4, 4, 3, 2, 0, 5, 4, 0, 20, 9, 5, 0, 10, 12})    // fd mapping, write, read
	f.Add([]byte{0, 0, 0, 8, 3, 2, 0, 2, 2, 2, 3, 3, 1, 1, 5, 0, 0, 0}) // add, remove the middle, protect
	f.Add([]byte{0, 0, 30, 8, 3, 2, 0, 3, 33, 2, 0, 0})                 // ranges past the end
	f.Add([]byte{1, 0, 2, 6, 3, 1, 7, 1, 0, 4, 4, 3, 3, 9, 4, 1, 2})    // overlapping fd mappings with replace
	f.Fuzz(func(t *testing.T, data []byte) {
		e := newEngine(t)
		defer e.close()
		e.run(&input{b: data}, 40)
	})
}

// TestArenaOpsRandom runs the fuzz engine on pseudo-random input, so plain go
// test covers it without -fuzz.
func TestArenaOpsRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	total := map[string]*[2]int{}
	for round := 0; round < 40; round++ {
		data := make([]byte, 800)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		e := newEngine(t)
		e.run(&input{b: data}, 100)
		e.close()
		for name, c := range e.outcomes {
			if total[name] == nil {
				total[name] = new([2]int)
			}
			total[name][0] += c[0]
			total[name][1] += c[1]
		}
	}
	// The input must have exercised both outcomes of every operation.
	for _, name := range []string{"AddAnonMapping", "AddFDMapping", "RemoveMapping", "Protect", "WriteAt", "ReadAt"} {
		c := total[name]
		require.NotNil(t, c, name)
		t.Logf("%-15s %4d succeeded, %4d failed", name, c[0], c[1])
		require.Positive(t, c[0], "%s never succeeded", name)
		require.Positive(t, c[1], "%s never failed", name)
	}
}
