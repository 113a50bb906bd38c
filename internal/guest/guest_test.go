package guest

import (
	"testing"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/kvm"
)

func TestSmoke(t *testing.T) {
	d, err := kvm.Open("")
	if err != nil {
		t.Skip(err)
	}
	defer d.Close()
	caps, _ := d.Capabilities()
	t.Logf("%+v", caps)
	vm, err := d.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	m, err := New(vm, Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ram, err := arena.NewAnon(16 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer ram.Close()
	if err := vm.SetSlot(kvm.Slot{ID: 5, GPA: 0, Size: 16 << 20, HostAddr: ram.Addr()}); err != nil {
		t.Fatal(err)
	}
	fill, err := m.LoadAsm(FillPages())
	if err != nil {
		t.Fatal(err)
	}
	res, err := m.Call(fill, kvm.Regs{RSI: 0, RDI: 16 << 20, RDX: 0x5a5a, RBX: 4096}, Handlers{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", res.Outs)
	v, _ := ram.ReadUint64(8192)
	if v != Pattern(8192, 0x5a5a) {
		t.Fatalf("got %#x", v)
	}
}
