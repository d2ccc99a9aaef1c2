# oneagent-csi: run `make help` for the targets.
SHELL := /bin/bash
GO ?= go
BIN := bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
GOLANGCI_LINT_VERSION ?= v2.15.0
# The image reference recorded in the tarball `make image` writes.
IMAGE ?= oneagent-csi:$(VERSION)
IMAGE_TAR := $(BIN)/oneagent-csi-image.tar
IMAGE_ARCHS := amd64 arm64
# Packages whose tests need root (real mounts); they skip when not root.
# The fleet test runs on its own (make fleet): its 20 node processes would
# starve the timing of tests running beside it.
PKGS = $(shell $(GO) list ./... | grep -v /test/fleet)

.PHONY: help build image test unit e2e fleet demo bench bench-e2e lint fmt vet run clean

help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z0-9_-]+:.*## /{printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build the static binary into bin/
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/oneagent-csi ./cmd/oneagent-csi

image: ## write the runtime image (linux/amd64 + linux/arm64 index) as an OCI tarball, bin/oneagent-csi-image.tar; no Docker needed
	@for arch in $(IMAGE_ARCHS); do \
	  CGO_ENABLED=0 GOOS=linux GOARCH=$$arch $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/linux-$$arch/oneagent-csi ./cmd/oneagent-csi || exit 1; \
	done
	$(GO) run ./hack/image --name $(IMAGE) --version $(VERSION) --out $(IMAGE_TAR) $(foreach a,$(IMAGE_ARCHS),--binary $(a)=$(BIN)/linux-$(a)/oneagent-csi)

test: build ## run every test under the race detector (real mounts need root)
	$(GO) vet $(PKGS)
	test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	ONEAGENT_CSI_BIN=$(CURDIR)/$(BIN)/oneagent-csi $(GO) test -race -count=1 -timeout 20m $(PKGS)
	$(GO) test -run '^$$' -fuzz '^FuzzAdmissionReview$$' -fuzztime 10s ./injector/
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) fleet; else echo "fleet: skipped, needs root"; fi
	$(MAKE) e2e

e2e: build image ## end to end against a real kube-apiserver, etcd, kubelet and containerd (root; builds them once)
	@if [ "$$(id -u)" != 0 ]; then echo "e2e: skipped, needs root"; exit 0; fi; \
	command -v containerd >/dev/null && command -v runc >/dev/null && command -v gcc >/dev/null && command -v iptables >/dev/null && \
	  [ -x /usr/lib/cni/bridge ] || \
	  { echo "e2e needs containerd, runc, gcc, iptables and the CNI plugins: apt-get install containerd runc gcc iptables containernetworking-plugins"; exit 1; }; \
	cd test/e2e && $(GO) vet ./... && E2E_K8S_BIN=$$(scripts/build-k8s.sh) && \
	  E2E_K8S_BIN=$$E2E_K8S_BIN ONEAGENT_CSI_BIN=$(CURDIR)/$(BIN)/oneagent-csi ONEAGENT_CSI_IMAGE=$(CURDIR)/$(IMAGE_TAR) \
	  $(GO) test -p 1 -count=1 -timeout 40m ./...

fleet: build ## 20 node processes install a new image at once through one pull-through mirror (root; see BENCHMARKS.md)
	ONEAGENT_CSI_BIN=$(CURDIR)/$(BIN)/oneagent-csi $(GO) test -count=1 -v -timeout 20m -run Fleet ./test/fleet/

demo: build ## a local cluster, fake tenant, node plugin and injector; deploys a sample app and shows the agent arrive (root)
	@command -v containerd >/dev/null && command -v runc >/dev/null && command -v gcc >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq containerd runc gcc >/dev/null; }
	cd test/e2e && E2E_K8S_BIN=$$(scripts/build-k8s.sh) && \
	  E2E_DEMO=1 E2E_K8S_BIN=$$E2E_K8S_BIN ONEAGENT_CSI_BIN=$(CURDIR)/$(BIN)/oneagent-csi $(GO) test -count=1 -timeout 30m -v -run '^TestDemo$$' .

unit: ## run the tests that need neither root nor the binary
	$(GO) test -race -count=1 ./api/... ./driver/... ./provisioner/... ./storage/... ./injector/... ./troubleshoot/... ./internal/... ./cmd/... ./test/manifests/

bench: build ## run the benchmarks (see BENCHMARKS.md)
	ONEAGENT_CSI_BIN=$(CURDIR)/$(BIN)/oneagent-csi $(GO) test -run '^$$' -bench . -benchtime 3x -count 1 -timeout 120m ./test/bench/
	$(GO) test -run '^$$' -bench . -count 1 ./injector/

bench-e2e: build ## pod start with and without injection, 20 pods at once, on the real cluster (root; see BENCHMARKS.md)
	cd test/e2e && E2E_K8S_BIN=$$(scripts/build-k8s.sh) && \
	  E2E_K8S_BIN=$$E2E_K8S_BIN ONEAGENT_CSI_BIN=$(CURDIR)/$(BIN)/oneagent-csi $(GO) test -run '^$$' -bench PodStart -benchtime 3x -timeout 30m .

lint: ## gofmt, go vet and golangci-lint
	test -z "$$(gofmt -l $$(git ls-files '*.go'))"
	$(GO) vet $(PKGS)
	$(GO) run github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION) run ./...
	cd test/e2e && $(GO) vet ./... && $(GO) run github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION) run --config ../../.golangci.yml ./...

run: build ## start the node plugin against the fake tenant and publish one volume (root)
	$(GO) run ./test/cmd/run-demo --binary $(BIN)/oneagent-csi

clean: ## remove build output
	rm -rf $(BIN)
