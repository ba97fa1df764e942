# shardgate — build, run, test.
#
#   make run    a demo fleet on 127.0.0.1:1883 (admin on 127.0.0.1:9883)
#   make test   install what the tests need, then vet and test everything
#   make bench  the benchmark figures of docs/benchmarks.md and docs/scale.md
#
# `make test` runs as root on a fresh Debian 12 machine: it installs Redis,
# Mosquitto, HAProxy and iproute2 from Debian's packages when they are missing.
#
#   make consul builds the real Consul agent the tests run (bin/consul)

GO       ?= go
BIN      := bin/shardgate
PKGS     := ./...
# A count, not a duration: with a duration, Go 1.26's fuzz coordinator can
# report a spurious "context deadline exceeded" at the deadline (Go issue
# 75804, fixed in Go 1.27).
FUZZTIME ?= 100000x

.PHONY: all build run test deps consul vet unit fuzz bench bench-idle generate clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/shardgate

run: build
	$(BIN) demo

# deps installs the real servers and tools the tests talk to.
deps:
	@missing=""; \
	for p in redis-server:redis-server mosquitto:mosquitto mosquitto_pub:mosquitto-clients ip:iproute2 haproxy:haproxy; do \
		cmd=$${p%%:*}; pkg=$${p#*:}; \
		command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(GO) mod download

# consul builds the real Consul agent that internal/consultest runs, from
# the Go module proxy through the small module in tools/consul. The build
# takes minutes, so the binary is kept outside the clone (CI runs a fresh
# clone on the same machine) and rebuilt only when tools/consul or these
# flags change; bin/consul links to it. Override the place with
# CONSUL_CACHE=/path/to/consul. By default it is /var/cache/shardgate/...,
# or ~/.cache/shardgate/... where /var/cache is not writable.
CONSUL_VERSION := v1.14.11
CONSUL_CACHE   ?=
CONSUL_LDFLAGS := -s -w -X github.com/hashicorp/consul/version.BuildDate=2023-10-31T18:07:09Z

consul:
	@set -e; \
	cache='$(CONSUL_CACHE)'; \
	if [ -z "$$cache" ]; then \
		dir=/var/cache/shardgate; \
		mkdir -p "$$dir" 2>/dev/null && [ -w "$$dir" ] || dir="$${XDG_CACHE_HOME:-$$HOME/.cache}/shardgate"; \
		cache="$$dir/consul-$(CONSUL_VERSION)/consul"; \
	fi; \
	key=$$(cat tools/consul/go.mod tools/consul/go.sum tools/consul/main.go | \
		{ cat; echo '$(CONSUL_LDFLAGS)'; } | sha256sum | cut -c1-16); \
	if [ -x "$$cache" ] && [ "$$(cat "$$cache.key" 2>/dev/null)" = "$$key" ]; then \
		echo "consul: cached $$cache"; \
	else \
		echo "consul: building $(CONSUL_VERSION) into $$cache (a few minutes, once per machine)"; \
		mkdir -p "$$(dirname "$$cache")"; \
		tmp="$$cache.tmp.$$$$"; trap 'rm -f "$$tmp"' EXIT; \
		start=$$(date +%s); \
		(cd tools/consul && CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(CONSUL_LDFLAGS)' -o "$$tmp" .); \
		mv -f "$$tmp" "$$cache"; echo "$$key" > "$$cache.key"; \
		echo "consul: built in $$(( $$(date +%s) - start ))s"; \
	fi; \
	mkdir -p bin; ln -sfn "$$cache" bin/consul; \
	bin/consul version | head -n1 | grep -qx 'Consul $(CONSUL_VERSION)' || \
		{ echo "consul: bin/consul is not Consul $(CONSUL_VERSION)"; exit 1; }

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' | grep -v '_bpfe[lb]\.go$$')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet $(PKGS)

unit:
	$(GO) test -count=1 -timeout 15m $(PKGS)

# fuzz gives every fuzzer a short run beyond its kept corpus (which `unit`
# already replays).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseConnect$$' -fuzztime $(FUZZTIME) ./mqttwire/
	$(GO) test -run '^$$' -fuzz '^FuzzFramer$$' -fuzztime $(FUZZTIME) ./mqttwire/
	$(GO) test -run '^$$' -fuzz '^FuzzConnackProperties$$' -fuzztime $(FUZZTIME) ./mqttwire/
	$(GO) test -run '^$$' -fuzz '^FuzzACLOwnSubtree$$' -fuzztime $(FUZZTIME) ./broker/

test: deps consul vet unit fuzz

# bench reproduces the benchmark figures on this machine, as root, in about
# 25 minutes: shardgate against HAProxy 2.6 and direct-to-broker (the
# "Against HAProxy" section of docs/benchmarks.md, plots in docs/img), then
# 100,000 devices held 5 minutes through proxy workers and two 50,000-device
# storms (the "Latest make bench run" sections of docs/scale.md). HAProxy
# comes from Debian's package (make deps).
bench: build deps
	$(BIN) bench compare --runs 3 --out docs/benchmarks.md --section compare --img-dir docs/img
	$(BIN) bench scale --out docs/scale.md
	$(BIN) bench scale --storm --out docs/scale.md

# bench-idle measures the proxy's memory and fds per idle connection
# (figures in docs/benchmarks.md).
bench-idle: build
	$(BIN) bench idle --conns 9000

# generate rebuilds the committed eBPF objects (ebpf/*_bpfel.go, *_bpfel.o)
# from their C sources with bpf2go (a go.mod tool). Only needed after editing
# a .c file; `make build` and `make test` use the committed output and need no
# C toolchain. Needs clang, llvm and libbpf-dev (Debian: apt-get install -y
# clang llvm libbpf-dev).
# BPF_MULTIARCH is the Debian multiarch directory holding asm/types.h for
# the build host (x86_64-linux-gnu, aarch64-linux-gnu, ...).
BPF_MULTIARCH ?= $(shell gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null)

generate:
	BPF_MULTIARCH=$(BPF_MULTIARCH) $(GO) generate ./ebpf/

clean:
	rm -rf bin
