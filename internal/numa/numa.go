// Package numa reads the host's NUMA nodes from sysfs
// (/sys/devices/system/node), for the packages that place guest memory on
// them (arena, guestmem) and the one that reports them (host). Paths are
// relative to an fs.FS rooted at the host's "/", so tests can hand in a
// fake host.
package numa

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
)

// Dir is the nodes' directory, relative to the root.
const Dir = "sys/devices/system/node"

// MaxNode is the highest node number accepted: the kernel's MAX_NUMNODES
// is at most 1 << 10.
const MaxNode = 1<<10 - 1

// ErrNoNode is wrapped by Check's error for a node that does not exist.
var ErrNoNode = errors.New("no such NUMA node")

// ErrNoMemory is wrapped by Check's error for a node without memory (a
// CPU-only or memoryless node), which no page can be placed on.
var ErrNoMemory = errors.New("NUMA node has no memory")

// Node is one node: its CPUs and memory.
type Node struct {
	ID      int
	CPUList string // the node's cpulist as the kernel prints it, "0-3,8-11"; "" for none
	Total   uint64 // MemTotal, bytes
	Free    uint64 // MemFree, bytes
}

// CPUs returns the CPUs of CPUList; nil when it is empty or malformed.
func (n Node) CPUs() []int {
	cpus, err := ParseList(n.CPUList)
	if err != nil {
		return nil
	}
	return cpus
}

// Nodes lists the nodes under root, lowest first; none on a kernel built
// without NUMA (no such directory).
func Nodes(root fs.FS) []Node {
	ents, err := fs.ReadDir(root, Dir)
	if err != nil {
		return nil
	}
	var nodes []Node
	for _, e := range ents {
		s, ok := strings.CutPrefix(e.Name(), "node")
		id, err := strconv.Atoi(s)
		if !ok || err != nil || id < 0 {
			continue
		}
		if n, err := Read(root, id); err == nil {
			nodes = append(nodes, n)
		}
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].ID < nodes[j].ID })
	return nodes
}

// Read reads node id. A node without a directory is ErrNoNode; a node
// whose meminfo cannot be read has zero memory.
func Read(root fs.FS, id int) (Node, error) {
	dir := path.Join(Dir, "node"+strconv.Itoa(id))
	if _, err := fs.Stat(root, dir); err != nil {
		return Node{}, fmt.Errorf("node %d: %w (no /%s)", id, ErrNoNode, dir)
	}
	n := Node{ID: id}
	if b, err := fs.ReadFile(root, path.Join(dir, "cpulist")); err == nil {
		n.CPUList = strings.TrimSpace(string(b))
	}
	// "Node 0 MemTotal:       11626232 kB"
	b, _ := fs.ReadFile(root, path.Join(dir, "meminfo"))
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		v, err := strconv.ParseUint(f[3], 10, 64)
		if err != nil {
			continue
		}
		switch f[2] {
		case "MemTotal:":
			n.Total = v << 10
		case "MemFree:":
			n.Free = v << 10
		}
	}
	return n, nil
}

// Check returns the nodes ids, each of which must exist and have memory;
// the error names the first that does not, and which nodes do.
func Check(root fs.FS, ids []int) ([]Node, error) {
	out := make([]Node, 0, len(ids))
	for _, id := range ids {
		n, err := Read(root, id)
		if err == nil && n.Total == 0 {
			err = fmt.Errorf("node %d: %w (MemTotal 0 in /%s/node%d/meminfo)", id, ErrNoMemory, Dir, id)
		}
		if err != nil {
			return nil, fmt.Errorf("%w; nodes with memory: %s", err, withMemory(root))
		}
		out = append(out, n)
	}
	return out, nil
}

// withMemory lists the nodes that have memory, for error messages.
func withMemory(root fs.FS) string {
	var ids []string
	for _, n := range Nodes(root) {
		if n.Total > 0 {
			ids = append(ids, strconv.Itoa(n.ID))
		}
	}
	if len(ids) == 0 {
		return "none (a kernel without NUMA)"
	}
	return strings.Join(ids, ",")
}

// ParseList parses a kernel list format ("0-3,8,10-11") into its numbers,
// ascending as written. "" is an empty list.
func ParseList(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var out []int
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil || a < 0 {
			return nil, fmt.Errorf("numa: list %q: bad number %q", s, lo)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a || b-a > 1<<16 {
				return nil, fmt.Errorf("numa: list %q: bad range %q", s, part)
			}
		}
		for i := a; i <= b; i++ {
			out = append(out, i)
		}
	}
	return out, nil
}
