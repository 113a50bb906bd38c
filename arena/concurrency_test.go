package arena_test

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
)

// TestConcurrentAccessWhileRemapping runs accessors on fixed ranges while
// another goroutine keeps adding, re-protecting and removing other ranges of
// the same arena. Run under -race; every accessor must see its own data.
func TestConcurrentAccessWhileRemapping(t *testing.T) {
	const (
		slot    = 1 << 20
		workers = 4
		rounds  = 200
	)
	a := newArena(t, 2*workers*slot)
	for w := 0; w < workers; w++ {
		require.NoError(t, a.AddAnonMapping(int64(w)*slot, slot, arena.ProtReadWrite, arena.Private()))
	}
	fd := newMemfd(t, slot)

	var wg sync.WaitGroup
	errs := make(chan error, workers+1)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			base := int64(w) * slot
			want := bytes.Repeat([]byte{byte(w + 1)}, 4096)
			got := make([]byte, len(want))
			for i := 0; i < rounds; i++ {
				off := base + int64(i%200)*4096
				if _, err := a.WriteAt(want, off); err != nil {
					errs <- err
					return
				}
				if _, err := a.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
					errs <- errors.Join(err, errors.New("read back different data"))
					return
				}
				if _, err := a.CompareAndSwapUint64(base+slot-8, uint64(i), uint64(i+1)); err != nil {
					errs <- err
					return
				}
				if err := a.Populate(base+slot-4096, 4096, arena.PopulateWrite); err != nil {
					errs <- err
					return
				}
				_ = a.Mappings()
			}
		}(w)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			off := int64(workers+i%workers) * slot
			var err error
			if i%2 == 0 {
				err = a.AddFDMapping(off, slot, fd, 0, arena.ProtReadWrite)
			} else {
				err = a.AddAnonMapping(off, slot, arena.ProtReadWrite)
			}
			if err == nil {
				err = a.Protect(off, 4096, arena.ProtRead)
			}
			if err == nil {
				_, err = a.Resident(off, slot)
			}
			if err == nil {
				err = a.RemoveMapping(off, slot)
			}
			if err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	for w := 0; w < workers; w++ {
		v, err := a.LoadUint64(int64(w+1)*slot - 8) // the counter beyond the pages written
		require.NoError(t, err)
		require.Equal(t, uint64(rounds), v)
	}
}

// TestCloseWhileAccessing closes an arena under concurrent accessors: each
// access either completes or reports ErrClosed; none touches freed memory.
func TestCloseWhileAccessing(t *testing.T) {
	a, err := arena.New(4 << 20)
	require.NoError(t, err)
	require.NoError(t, a.AddAnonMapping(0, 4<<20, arena.ProtReadWrite))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			buf := make([]byte, 64<<10)
			for {
				if _, err := a.ReadAt(buf, 0); err != nil {
					require.ErrorIs(t, err, arena.ErrClosed)
					return
				}
			}
		}()
	}
	close(start)
	require.NoError(t, a.Close())
	wg.Wait()
}
