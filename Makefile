# The documented entry points. `make test` is the one command that must pass
# on a fresh machine; .ci/run calls it.

GO          ?= go
BENCH_COUNT ?= 5
FUZZTIME    ?= 20s
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: test fmt-check vet unit bench-smoke bench fuzz lint build demo bench-setup test-kvm-qemu

test: fmt-check vet unit bench-smoke

fmt-check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change:"; echo "$$unformatted"; exit 1; fi

# vet for arm64 too: the library must build there (README says what does).
vet:
	$(GO) vet ./...
	CGO_ENABLED=0 GOARCH=arm64 $(GO) vet ./...

unit:
	$(GO) test -race -count=1 ./...

# Every benchmark once, so none of them rots.
bench-smoke:
	$(GO) test -run '^$$' -bench . -benchtime 1x ./...

# The KVM tests on a machine without /dev/kvm: in a QEMU VM (software
# emulation, nested SVM) running Debian's kernel with kvm_amd.
test-kvm-qemu:
	bash .ci/kvm-in-qemu

bench:
	$(GO) test -run '^$$' -bench . -benchmem -count $(BENCH_COUNT) ./... | tee bench.out

# A short run of every fuzz target, found with go test -list.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
		for target in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
			echo "fuzzing $$pkg $$target for $(FUZZTIME)"; \
			$(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

lint: fmt-check vet
	$(GO) run ./internal/lint/unsafecheck .
	$(GO) run $(STATICCHECK) ./...

build:
	$(GO) build ./...

# The demo guest: map, prefault, register with KVM, guest writes and verifies
# every page, dirty pages, balloon, snapshot. Needs /dev/kvm.
demo:
	$(GO) run ./cmd/gmem run

# The default guest-memory setup benchmark, against its peers, with the chart
# under docs/ (docs/gmem.md explains the method and the figures).
bench-setup:
	$(GO) run ./cmd/gmem bench --plot docs/bench-setup.svg
