package arena

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/numa"
)

// ErrNUMANode is wrapped by the error of a memory policy naming a NUMA node
// that does not exist or has no memory (a CPU-only node). The policy is
// refused before the kernel is asked, so nothing changes.
var ErrNUMANode = errors.New("NUMA node unavailable")

// The memory policy modes and flags of <linux/mempolicy.h>.
const (
	mpolDefault    = 0
	mpolPreferred  = 1
	mpolBind       = 2
	mpolInterleave = 3
	mpolLocal      = 4
	mpolModeFlags  = 1<<15 | 1<<14 | 1<<13 // MPOL_F_STATIC_NODES, _RELATIVE_NODES, _NUMA_BALANCING

	mpolFNode = 1 << 0 // get_mempolicy: the node of the page at addr
	mpolFAddr = 1 << 1 // get_mempolicy: the policy of the VMA at addr

	mpolMFStrict = 1 << 0 // mbind: fail if pages already present are not on the policy's nodes...
	mpolMFMove   = 1 << 1 // ...after moving those mapped only by this process
)

// NUMAMode is the mode of a NUMAPolicy.
type NUMAMode int

// The modes; String gives the word /proc/<pid>/numa_maps prints for each.
const (
	NUMADefaultMode    NUMAMode = mpolDefault    // the process's policy: usually the faulting CPU's node
	NUMAPreferredMode  NUMAMode = mpolPreferred  // one node first, others when it is full
	NUMABindMode       NUMAMode = mpolBind       // only these nodes; out of memory rather than elsewhere
	NUMAInterleaveMode NUMAMode = mpolInterleave // page by page round-robin over the nodes
	NUMALocalMode      NUMAMode = mpolLocal      // the faulting CPU's node (get_mempolicy may report it)
)

// String returns the mode as numa_maps prints it.
func (m NUMAMode) String() string {
	switch m {
	case NUMADefaultMode:
		return "default"
	case NUMAPreferredMode:
		return "prefer"
	case NUMABindMode:
		return "bind"
	case NUMAInterleaveMode:
		return "interleave"
	case NUMALocalMode:
		return "local"
	}
	return "NUMAMode(" + strconv.Itoa(int(m)) + ")"
}

// NUMAPolicy is a host memory policy for a range of memory: which NUMA
// nodes its pages come from (mbind(2)). The zero value is the default
// policy. Make one with NUMABind, NUMAPreferred or NUMAInterleave.
type NUMAPolicy struct {
	mode  NUMAMode
	nodes []int // sorted, no duplicates
}

// NUMABind allocates only from nodes (MPOL_BIND): when they are full, the
// fault fails (Populate reports it) rather than taking memory elsewhere.
func NUMABind(nodes ...int) NUMAPolicy { return newPolicy(NUMABindMode, nodes) }

// NUMAPreferred allocates from node first, from other nodes when it is
// full (MPOL_PREFERRED).
func NUMAPreferred(node int) NUMAPolicy { return newPolicy(NUMAPreferredMode, []int{node}) }

// NUMAInterleave spreads pages round-robin over nodes (MPOL_INTERLEAVE),
// for bandwidth over locality.
func NUMAInterleave(nodes ...int) NUMAPolicy { return newPolicy(NUMAInterleaveMode, nodes) }

func newPolicy(mode NUMAMode, nodes []int) NUMAPolicy {
	n := slices.Clone(nodes)
	slices.Sort(n)
	return NUMAPolicy{mode: mode, nodes: slices.Compact(n)}
}

// Mode returns the policy's mode.
func (p NUMAPolicy) Mode() NUMAMode { return p.mode }

// Nodes returns the policy's nodes, lowest first (none for the default).
func (p NUMAPolicy) Nodes() []int { return slices.Clone(p.nodes) }

// IsDefault reports whether p is the default policy.
func (p NUMAPolicy) IsDefault() bool { return p.mode == NUMADefaultMode }

// String gives the policy as /proc/<pid>/numa_maps prints it: "default",
// "bind:0-1", "prefer:0", "interleave:0,2".
func (p NUMAPolicy) String() string {
	if len(p.nodes) == 0 {
		return p.mode.String()
	}
	var parts []string
	for i := 0; i < len(p.nodes); {
		j := i
		for j+1 < len(p.nodes) && p.nodes[j+1] == p.nodes[j]+1 {
			j++
		}
		if j > i {
			parts = append(parts, strconv.Itoa(p.nodes[i])+"-"+strconv.Itoa(p.nodes[j]))
		} else {
			parts = append(parts, strconv.Itoa(p.nodes[i]))
		}
		i = j + 1
	}
	return p.mode.String() + ":" + strings.Join(parts, ",")
}

// Equal reports whether p and q are the same policy.
func (p NUMAPolicy) Equal(q NUMAPolicy) bool {
	return p.mode == q.mode && slices.Equal(p.nodes, q.nodes)
}

// Check reports whether p can be applied on the host whose files are under
// root (the host's "/"; nil is the running host): its nodes must be listed
// in /sys/devices/system/node and have memory. The error wraps ErrNUMANode
// (and names the nodes that have memory), or ErrBadOption for a policy that
// names no node or a negative one.
func (p NUMAPolicy) Check(root fs.FS) error {
	if root == nil {
		root = hostRoot
	}
	switch p.mode {
	case NUMADefaultMode:
		return nil
	case NUMAPreferredMode, NUMABindMode, NUMAInterleaveMode:
	default:
		return fmt.Errorf("arena: NUMA policy %v: %w", p, ErrBadOption)
	}
	if len(p.nodes) == 0 {
		return fmt.Errorf("arena: NUMA policy %v names no node: %w", p.mode, ErrBadOption)
	}
	if p.nodes[0] < 0 || p.nodes[len(p.nodes)-1] > numa.MaxNode {
		return fmt.Errorf("arena: NUMA policy %v: nodes are 0 to %d: %w", p, numa.MaxNode, ErrBadOption)
	}
	if _, err := numa.Check(root, p.nodes); err != nil {
		return fmt.Errorf("arena: NUMA policy %v: %w: %w", p, ErrNUMANode, err)
	}
	return nil
}

// hostRoot is where the running host's /sys is read.
var hostRoot fs.FS = os.DirFS("/")

// maskWords is the size of node masks passed to the kernel: 1024 nodes,
// the most any kernel configures (MAX_NUMNODES).
const maskWords = (numa.MaxNode + 1) / 64

// mask returns p's nodes as a kernel node mask.
func (p NUMAPolicy) mask() []uint64 {
	m := make([]uint64, maskWords)
	for _, n := range p.nodes {
		m[n/64] |= 1 << (n % 64)
	}
	return m
}

// SetNUMAPolicy sets the host memory policy of the range (mbind(2)), with
// MPOL_MF_STRICT|MPOL_MF_MOVE as Cloud Hypervisor and QEMU do: pages already
// present are moved to the policy's nodes, and the call fails (EIO) if some
// cannot be. Set it before the range is populated, so nothing needs moving.
// The policy's nodes are checked first (see NUMAPolicy.Check): a node that
// does not exist or has no memory is an error wrapping ErrNUMANode, and
// nothing changes. A policy is kept by the memory area, so remapping the
// range (Arena.AddAnonMapping with Replace, RemoveMapping) resets it to the
// default; for shared memory (a memfd) it is the file's, as for shmem.
func (m *Mapping) SetNUMAPolicy(off, n int64, p NUMAPolicy) error {
	const op = "SetNUMAPolicy"
	if err := p.Check(nil); err != nil {
		return err
	}
	err := m.rangeCall(op, "mbind", off, n, func(a uintptr, n int64) syscall.Errno {
		if p.mode == NUMADefaultMode {
			return sysMbind(a, n, mpolDefault, nil, 0)
		}
		return sysMbind(a, n, int(p.mode), p.mask(), mpolMFStrict|mpolMFMove)
	})
	if errors.Is(err, unix.EIO) {
		return fmt.Errorf("%w (pages already present could not all be moved to the policy's nodes: "+
			"mapped by another process too, or the nodes are full)", err)
	}
	return err
}

// NUMAPolicyAt returns the memory policy of the page at off as the kernel
// reports it (get_mempolicy with MPOL_F_ADDR): the policy its memory area
// has, or the default.
func (m *Mapping) NUMAPolicyAt(off int64) (NUMAPolicy, error) {
	defer m.runlock(m.rlock())
	const op = "NUMAPolicyAt"
	if err := m.checkPages(op, off&^(pageSize-1), pageSize, true); err != nil {
		return NUMAPolicy{}, err
	}
	mask := make([]uint64, maskWords)
	mode, errno := sysGetMempolicy(mask, m.addr+uintptr(off), mpolFAddr)
	if errno != 0 {
		return NUMAPolicy{}, &OpError{Op: op, Offset: off, Length: 1, Err: syscallErr("get_mempolicy", errno)}
	}
	p := NUMAPolicy{mode: NUMAMode(mode &^ mpolModeFlags)}
	if p.mode != NUMADefaultMode && p.mode != NUMALocalMode {
		for i := range maskWords * 64 {
			if mask[i/64]&(1<<(i%64)) != 0 {
				p.nodes = append(p.nodes, i)
			}
		}
	}
	return p, nil
}

// PageNodes returns the NUMA node of each page of the range, as the kernel
// reports it (move_pages(2) with no target nodes, which moves nothing): -1
// for a page that is not present (never touched, or swapped out). It
// faults nothing in.
func (m *Mapping) PageNodes(off, n int64) ([]int, error) {
	defer m.runlock(m.rlock())
	const op = "PageNodes"
	if err := m.checkPages(op, off, n, true); err != nil {
		return nil, err
	}
	count := int(n / pageSize)
	out := make([]int, count)
	const batch = 1 << 14
	pages := make([]uintptr, min(count, batch))
	status := make([]int32, len(pages))
	for done := 0; done < count; done += len(pages) {
		pages, status = pages[:min(batch, count-done)], status[:min(batch, count-done)]
		for i := range pages {
			pages[i] = m.addr + uintptr(off) + uintptr(done+i)*uintptr(pageSize)
		}
		if errno := sysMovePages(pages, status); errno != 0 {
			return nil, &OpError{Op: op, Offset: off, Length: n, Err: syscallErr("move_pages", errno)}
		}
		for i, s := range status {
			out[done+i] = int(s)
			if s < 0 { // -ENOENT: not present; -EFAULT: a zero page or a special mapping
				out[done+i] = -1
			}
		}
	}
	return out, nil
}
