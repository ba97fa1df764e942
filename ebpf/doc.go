// Package ebpf holds shardgate's eBPF programs and their loaders.
//
// Steering (reuseport.c) is an SK_REUSEPORT program attached as
// SELECT_OR_MIGRATE to a listen address's SO_REUSEPORT group: it sends every
// new connection to a listener of the active proxy generation, and moves the
// connections queued on a closing listener to it instead of resetting them.
// Its maps are pinned in bpffs so the next proxy process finds them.
//
// The C sources carry `//go:build ignore`; `make generate` (go generate)
// rebuilds the committed *_bpfel.go / *_bpfel.o with bpf2go, so a plain go
// build needs no C toolchain.
package ebpf

//go:generate go tool bpf2go -tags linux -target bpfel -type active_gen reuseport reuseport.c -- -O2 -g -Wall -I/usr/include/$BPF_MULTIARCH
