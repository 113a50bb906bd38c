package host_test

import (
	"strings"
	"testing"

	"github.com/gmem-vmm/gmem/host"
)

// guest_memfd advice: what WithGuestMemfd gives where the host can map it,
// and why it is refused where it cannot; nothing without guest_memfd.
func TestAdviseGuestMemfd(t *testing.T) {
	for _, c := range []struct {
		caps host.KVMCaps
		want string
	}{
		{host.KVMCaps{GuestMemfd: true, GuestMemfdFlags: "mmap|init-shared", GuestMemfdMmap: true, ManualDirtyLog: true},
			"guest_memfd can be mapped by the host (flags mmap|init-shared)"},
		{host.KVMCaps{GuestMemfd: true, GuestMemfdFlags: "none", ManualDirtyLog: true},
			"the host cannot map it (flags none; mmap and init-shared need Linux 6.18)"},
		{host.KVMCaps{ManualDirtyLog: true}, ""},
	} {
		f := &host.Facts{KVM: host.KVM{Present: true, Usable: true, Caps: &c.caps}}
		var got []string
		for _, a := range host.Advise(f) {
			if a.Topic == host.TopicGuestMemfd {
				got = append(got, a.Text)
			}
		}
		switch {
		case c.want == "" && len(got) != 0:
			t.Errorf("%+v: advice %q, want none", c.caps, got)
		case c.want != "" && (len(got) != 1 || !strings.Contains(got[0], c.want)):
			t.Errorf("%+v: advice %q, want one containing %q", c.caps, got, c.want)
		}
	}
}
