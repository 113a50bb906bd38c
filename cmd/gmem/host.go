//go:build amd64

package main

import (
	"fmt"
	"io/fs"

	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/units"
)

// checkFits returns an error, with the numbers and the flag to change, when
// size bytes do not fit in the host's available memory. It is called before
// anything is allocated.
func checkFits(root fs.FS, size Size, flag string) error {
	mi, err := host.ReadMemInfo(root)
	if err != nil {
		return err
	}
	if uint64(size) > mi.Available {
		return fmt.Errorf("size %v (%d bytes) is more than this host's available memory: MemAvailable is %s "+
			"(%d bytes) of %s total (/proc/meminfo); choose a smaller %s", size, uint64(size),
			units.Human(mi.Available), mi.Available, units.Human(mi.Total), flag)
	}
	return nil
}
