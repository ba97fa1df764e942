# shardgate — build, run, test.
#
#   make run    a demo fleet on 127.0.0.1:1883 (admin on 127.0.0.1:9883)
#   make test   install what the tests need, then vet and test everything
#
# `make test` runs as root on a fresh Debian 12 machine: it installs Redis,
# Mosquitto and iproute2 from Debian's packages when they are missing.

GO       ?= go
BIN      := bin/shardgate
PKGS     := ./...
FUZZTIME ?= 10s

.PHONY: all build run test deps vet unit fuzz bench-idle generate clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/shardgate

run: build
	$(BIN) demo

# deps installs the real servers and tools the tests talk to.
deps:
	@missing=""; \
	for p in redis-server:redis-server mosquitto:mosquitto mosquitto_pub:mosquitto-clients ip:iproute2; do \
		cmd=$${p%%:*}; pkg=$${p#*:}; \
		command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(GO) mod download

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

test: deps vet unit fuzz

# bench-idle measures the proxy's memory and fds per idle connection
# (figures in docs/benchmarks.md).
bench-idle: build
	$(BIN) bench idle --conns 9000

clean:
	rm -rf bin
