module github.com/gmem-vmm/gmem

go 1.26.8

require golang.org/x/sys v0.50.0

require (
	github.com/stretchr/testify v1.12.1 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
)
