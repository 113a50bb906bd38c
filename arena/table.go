package arena

import "sort"

// entry records one mapping made at an offset of a Mapping or Arena.
type entry struct {
	off, size int64
	prot      Protection
	shared    bool
	anon      bool
	pageSize  int64 // base or hugetlb page size of the backing
	fd        int   // as given by the caller; -1 for anonymous memory
	fdOff     int64
	dev, ino  uint64
}

func (e entry) end() int64 { return e.off + e.size }

// table is the sorted, non-overlapping list of what is mapped.
type table []entry

// first returns the index of the first entry that ends after off.
func (t table) first(off int64) int {
	return sort.Search(len(t), func(i int) bool { return t[i].end() > off })
}

// covers reports whether [off, off+n) is mapped without gaps.
func (t table) covers(off, n int64) bool {
	pos, end := off, off+n
	for i := t.first(off); i < len(t) && pos < end; i++ {
		if t[i].off > pos {
			return false
		}
		pos = t[i].end()
	}
	return pos >= end
}

// overlaps reports whether any byte of [off, off+n) is mapped.
func (t table) overlaps(off, n int64) bool {
	i := t.first(off)
	return i < len(t) && t[i].off < off+n
}

// within returns the entries intersecting [off, off+n).
func (t table) within(off, n int64) []entry {
	i := t.first(off)
	j := i
	for j < len(t) && t[j].off < off+n {
		j++
	}
	return t[i:j]
}

// split cuts the entry containing at (strictly inside it) into two.
func (t *table) split(at int64) {
	i := t.first(at)
	if i == len(*t) || (*t)[i].off >= at {
		return
	}
	left := (*t)[i]
	right := left
	left.size = at - left.off
	right.off = at
	right.size -= left.size
	if !right.anon {
		right.fdOff += left.size
	}
	*t = append(*t, entry{})
	copy((*t)[i+2:], (*t)[i+1:])
	(*t)[i], (*t)[i+1] = left, right
}

// cut removes [off, off+n) from the table, splitting partly covered entries.
func (t *table) cut(off, n int64) {
	t.split(off)
	t.split(off + n)
	i := t.first(off)
	j := i
	for j < len(*t) && (*t)[j].off < off+n {
		j++
	}
	*t = append((*t)[:i], (*t)[j:]...)
}

// insert adds e, which must not overlap any entry.
func (t *table) insert(e entry) {
	i := t.first(e.off)
	*t = append(*t, entry{})
	copy((*t)[i+1:], (*t)[i:])
	(*t)[i] = e
}

// protect sets the protection of [off, off+n), splitting at its edges.
func (t *table) protect(off, n int64, p Protection) {
	t.split(off)
	t.split(off + n)
	for i := t.first(off); i < len(*t) && (*t)[i].off < off+n; i++ {
		(*t)[i].prot = p
	}
}
