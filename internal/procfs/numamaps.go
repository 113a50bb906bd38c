package procfs

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// NumaVMA is one memory area as /proc/<pid>/numa_maps reports it
// (proc(5)): its start address, its memory policy in the kernel's words
// ("default", "bind:0", "prefer:0", "interleave:0-1"), and how many of its
// pages are on each node.
type NumaVMA struct {
	Start  uintptr
	Policy string
	Nodes  map[int]int64 // node to pages, from the N<node>=<pages> fields
	Fields map[string]string
}

// Pages returns the pages of the VMA on any node.
func (v NumaVMA) Pages() int64 {
	var n int64
	for _, p := range v.Nodes {
		n += p
	}
	return n
}

// NumaMaps returns this process's /proc/self/numa_maps, lowest address
// first.
func NumaMaps() ([]NumaVMA, error) {
	f, err := os.Open("/proc/self/numa_maps")
	if err != nil {
		return nil, fmt.Errorf("procfs: %w", err)
	}
	defer f.Close()
	vmas, err := parseNumaMaps(f)
	if err != nil {
		return nil, fmt.Errorf("procfs: reading /proc/self/numa_maps: %w", err)
	}
	return vmas, nil
}

// NumaMapsRange returns the numa_maps records of the areas starting in
// [lo, hi).
func NumaMapsRange(lo, hi uintptr) ([]NumaVMA, error) {
	all, err := NumaMaps()
	if err != nil {
		return nil, err
	}
	var out []NumaVMA
	for _, v := range all {
		if v.Start >= lo && v.Start < hi {
			out = append(out, v)
		}
	}
	return out, nil
}

// parseNumaMaps parses numa_maps text: "7f...000 bind:0 anon=3 dirty=3 N0=3
// kernelpagesize_kB=4". Fields without '=' (a file path's words, "heap",
// "stack", "huge") are kept in Fields with an empty value.
func parseNumaMaps(r io.Reader) ([]NumaVMA, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	var out []NumaVMA
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		start, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			continue
		}
		v := NumaVMA{Start: uintptr(start), Policy: f[1], Nodes: map[int]int64{}, Fields: map[string]string{}}
		for _, kv := range f[2:] {
			k, val, _ := strings.Cut(kv, "=")
			if node, ok := strings.CutPrefix(k, "N"); ok {
				id, err1 := strconv.Atoi(node)
				pages, err2 := strconv.ParseInt(val, 10, 64)
				if err1 == nil && err2 == nil {
					v.Nodes[id] = pages
					continue
				}
			}
			v.Fields[k] = val
		}
		out = append(out, v)
	}
	return out, sc.Err()
}
