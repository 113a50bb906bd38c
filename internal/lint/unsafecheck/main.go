// Command unsafecheck enforces the project's rule for package unsafe: it may
// be imported only by files whose names end in _unsafe.go (or
// _unsafe_test.go), and every use must sit under a comment containing
// "Safety:" that ends at most six lines above it, in the same function (or
// its doc comment), and says why the use is sound. Uses in function
// signatures (an unsafe.Pointer parameter or result) are not operations and
// need no comment; uses outside functions do.
//
// Usage: go run ./internal/lint/unsafecheck [dir]
//
// It prints one line per violation and exits 1 if there are any.
package main

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// window is how many lines above a use its Safety comment may end.
const window = 6

func main() {
	root := "."
	if len(os.Args) > 1 {
		root = os.Args[1]
	}
	problems, err := check(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "unsafecheck:", err)
		os.Exit(2)
	}
	for _, p := range problems {
		fmt.Println(p)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
}

// check walks root and returns the violations found, as "file:line: why".
func check(root string) ([]string, error) {
	var problems []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != root && (strings.HasPrefix(name, ".") || name == "vendor" || name == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, ".go") {
			return nil
		}
		ps, err := checkFile(path)
		problems = append(problems, ps...)
		return err
	})
	return problems, err
}

// checkFile returns the violations in one Go source file.
func checkFile(path string) ([]string, error) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, nil, parser.ParseComments)
	if err != nil {
		return nil, err
	}
	local := unsafeName(f)
	if local == "" {
		return nil, nil
	}
	base := filepath.Base(path)
	if !strings.HasSuffix(base, "_unsafe.go") && !strings.HasSuffix(base, "_unsafe_test.go") {
		return []string{fmt.Sprintf("%s: imports unsafe; only *_unsafe.go files may", path)}, nil
	}
	// Lines on which a comment containing "Safety:" ends.
	safety := map[int]bool{}
	for _, cg := range f.Comments {
		if strings.Contains(cg.Text(), "Safety:") {
			safety[fset.Position(cg.End()).Line] = true
		}
	}
	var problems []string
	// check reports uses of unsafe within node lacking a Safety comment at
	// most window lines above, and no higher than line first.
	check := func(node ast.Node, first int) {
		ast.Inspect(node, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if id, ok := sel.X.(*ast.Ident); !ok || id.Name != local {
				return true
			}
			line := fset.Position(sel.Pos()).Line
			for l := line; l >= line-window && l >= first; l-- {
				if safety[l] {
					return true
				}
			}
			problems = append(problems, fmt.Sprintf("%s:%d: unsafe.%s without a // Safety: comment in the %d lines above",
				path, line, sel.Sel.Name, window))
			return true
		})
	}
	for _, decl := range f.Decls {
		switch d := decl.(type) {
		case *ast.FuncDecl:
			if d.Body == nil {
				continue
			}
			first := fset.Position(d.Pos()).Line
			if d.Doc != nil {
				first = fset.Position(d.Doc.Pos()).Line
			}
			// Only the body: naming unsafe.Pointer in a signature is not a use.
			check(d.Body, first)
		case *ast.GenDecl:
			if d.Tok == token.IMPORT {
				continue
			}
			first := fset.Position(d.Pos()).Line
			if d.Doc != nil {
				first = fset.Position(d.Doc.Pos()).Line
			}
			check(d, first)
		}
	}
	return problems, nil
}

// unsafeName returns the name the file binds package unsafe to, or "".
func unsafeName(f *ast.File) string {
	for _, imp := range f.Imports {
		if p, _ := strconv.Unquote(imp.Path.Value); p == "unsafe" {
			if imp.Name != nil {
				return imp.Name.Name
			}
			return "unsafe"
		}
	}
	return ""
}
