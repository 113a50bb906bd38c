package vhostuser_test

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/vhostuser"
)

// FuzzBackendMessage sends the Backend one message of any request, flags,
// payload and descriptor count (each a 1 MiB memfd) over a real socket. It
// must never panic, must keep no descriptor it was sent whatever it
// decides, and a table it accepts must be one a back end can use: regions
// in order, not overlapping, each inside its fd.
func FuzzBackendMessage(f *testing.F) {
	f.Add(uint32(vhostuser.SetMemTable), uint32(vhostuser.Version), memTable(1, vhostuser.MemoryRegion{MemorySize: 4096}), uint8(1))
	f.Add(uint32(vhostuser.SetMemTable), uint32(vhostuser.Version), memTable(2, region(0, 8192), region(4096, 4096)), uint8(2))
	f.Add(uint32(vhostuser.SetLogBase), uint32(vhostuser.Version), vhostuser.LogArea{Size: 64}.Encode(), uint8(1))
	f.Add(uint32(vhostuser.AddMemReg), uint32(vhostuser.Version|vhostuser.FlagNeedReply), vhostuser.EncodeMemRegion(region(0, 4096)), uint8(1))
	f.Add(uint32(vhostuser.GetFeatures), uint32(1), []byte(nil), uint8(0))
	f.Fuzz(func(t *testing.T, req, flags uint32, payload []byte, nfds uint8) {
		if len(payload) > 4096 {
			payload = payload[:4096]
		}
		memfdFD, err := unix.MemfdCreate("fuzz", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(memfdFD)
		if err := unix.Ftruncate(memfdFD, 1<<20); err != nil {
			t.Fatal(err)
		}
		before := fdCount(t)
		fc, bc := connPair(t)
		b := vhostuser.NewBackend(bc, vhostuser.BackendConfig{})
		// Negotiate everything, so the memory requests are legal.
		r := &rawFrontend{t: t, c: fc, b: b}
		all := vhostuser.ProtocolLogShmfd | vhostuser.ProtocolReplyAck | vhostuser.ProtocolConfigureMemSlots
		if err := r.handle(vhostuser.SetProtocolFeatures, vhostuser.Version, binary.NativeEndian.AppendUint64(nil, all)); err != nil {
			t.Fatal(err)
		}
		fds := make([]int, nfds%10)
		for i := range fds {
			fds[i] = memfdFD
		}
		h := binary.NativeEndian.AppendUint32(nil, req)
		h = binary.NativeEndian.AppendUint32(h, flags)
		h = binary.NativeEndian.AppendUint32(h, uint32(len(payload)))
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		if _, _, err := fc.WriteMsgUnix(append(h, payload...), oob, nil); err != nil {
			t.Fatal(err)
		}
		fc.CloseWrite()
		_, err = b.Next()
		regions := b.Memory().Regions()
		if err != nil && vhostuser.Request(req) == vhostuser.SetMemTable && len(regions) != 0 {
			t.Fatalf("a refused table left %d regions mapped: %v", len(regions), err)
		}
		for i, rg := range regions {
			if rg.MmapOffset+rg.MemorySize > 1<<20 || rg.MemorySize == 0 {
				t.Fatalf("accepted region %+v outside its 1 MiB fd", rg)
			}
			if i > 0 && regions[i-1].End() > rg.GuestPhysAddr {
				t.Fatalf("accepted overlapping regions %+v, %+v", regions[i-1], rg)
			}
		}
		fc.Close()
		b.Close()
		if after := fdCount(t); after != before {
			t.Fatalf("%d descriptors before, %d after (err %v)", before, after, err)
		}
	})
}
