package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		p := filepath.Join(dir, name)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
	}
	return dir
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  int
	}{
		{"clean", map[string]string{"a.go": "package a\n\nfunc F() {}\n"}, 0},
		{"unsafe outside _unsafe.go", map[string]string{
			"a.go": "package a\n\nimport \"unsafe\"\n\n// Safety: fine\nvar _ = unsafe.Sizeof(0)\n",
		}, 1},
		{"use without Safety comment", map[string]string{
			"a_unsafe.go": "package a\n\nimport \"unsafe\"\n\nfunc F(p *int) uintptr {\n\treturn uintptr(unsafe.Pointer(p))\n}\n",
		}, 1},
		{"use with Safety comment", map[string]string{
			"a_unsafe.go": "package a\n\nimport \"unsafe\"\n\nfunc F(p *int) uintptr {\n\t// Safety: only the address is kept.\n\treturn uintptr(unsafe.Pointer(p))\n}\n",
		}, 0},
		{"Safety comment too far above", map[string]string{
			"a_unsafe.go": "package a\n\nimport \"unsafe\"\n\nfunc F(p *int) uintptr {\n\t// Safety: only the address is kept.\n\n\n\n\n\n\n\n\treturn uintptr(unsafe.Pointer(p))\n}\n",
		}, 1},
		{"Safety comment in another function", map[string]string{
			"a_unsafe.go": "package a\n\nimport \"unsafe\"\n\n// Safety: not for G.\nfunc F() {}\nfunc G(p *int) uintptr { return uintptr(unsafe.Pointer(p)) }\n",
		}, 1},
		{"package-level use", map[string]string{
			"a_unsafe.go": "package a\n\nimport \"unsafe\"\n\nvar size = unsafe.Sizeof(0)\n\n// Safety: a size only.\nvar other = unsafe.Sizeof(1)\n",
		}, 1},
		{"signature only", map[string]string{
			"a_unsafe.go": "package a\n\nimport \"unsafe\"\n\nfunc F(p unsafe.Pointer) {}\n",
		}, 0},
		{"renamed import", map[string]string{
			"a_unsafe.go": "package a\n\nimport u \"unsafe\"\n\nfunc F(p *int) uintptr {\n\treturn uintptr(u.Pointer(p))\n}\n",
		}, 1},
		{"test file", map[string]string{
			"a_unsafe_test.go": "package a\n\nimport \"unsafe\"\n\nfunc F(p *int) uintptr {\n\t// Safety: test.\n\treturn uintptr(unsafe.Pointer(p))\n}\n",
			"b_test.go":        "package a\n\nimport \"unsafe\"\n\nvar _ = unsafe.Sizeof(0)\n",
		}, 1},
		{"hidden and testdata dirs skipped", map[string]string{
			".git/x.go":        "package x\n\nimport \"unsafe\"\n\nvar _ = unsafe.Sizeof(0)\n",
			"testdata/y.go":    "package y\n\nimport \"unsafe\"\n\nvar _ = unsafe.Sizeof(0)\n",
			"sub/ok_unsafe.go": "package sub\n\nimport \"unsafe\"\n\nfunc F() uintptr {\n\t// Safety: a size.\n\treturn unsafe.Sizeof(0)\n}\n",
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			problems, err := check(writeTree(t, tc.files))
			require.NoError(t, err)
			require.Len(t, problems, tc.want, "%v", problems)
		})
	}
}

// TestModuleIsClean runs the check on this module itself, so go test
// enforces the rule even where make lint is not run.
func TestModuleIsClean(t *testing.T) {
	problems, err := check("../../..")
	require.NoError(t, err)
	require.Empty(t, problems)
}
