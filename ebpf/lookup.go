//go:build linux

package ebpf

//go:generate go tool bpf2go -tags linux -target bpfel -type lookup_key lookup lookup.c -- -O2 -g -Wall -I/usr/include/$BPF_MULTIARCH

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"

	"github.com/cilium/ebpf/link"
	"github.com/prometheus/client_golang/prometheus"
)

// maxVIPPrefixes is MAX_PREFIXES in lookup.c.
const maxVIPPrefixes = 1024

// Counter indexes, the enum in lookup.c.
const (
	vipMatched = iota
	vipNotVIP
	vipNoSocket
	vipAssignError
	vipCounters
)

var vipResults = [vipCounters]string{"matched", "not_vip", "no_socket", "assign_error"}

// VIP is an SK_LOOKUP program attached to a network namespace: every TCP
// connection to an address in its prefixes, on a port in its ranges, goes to
// one listener, wherever that listener is bound, with no socket bound to the
// VIP addresses. Connections to other addresses or ports are left to the
// kernel's own lookup (so they reach a socket bound there, or are refused).
//
// The listener is held in a SOCKMAP. A socket cannot sit in a SOCKMAP and a
// REUSEPORT_SOCKARRAY at once, so the listener must not be one of the
// listeners the reuseport steering program (Steering) holds: give the VIP a
// listener of its own (any address, port 0 is fine). When the listener is
// closed the kernel drops it from the SOCKMAP, and VIP connections are
// refused (counted as no_socket) until Close or another AttachVIP.
//
// Nothing is pinned: the link lives as long as the process (or Close). When
// two processes attach a VIP program to the same namespace (a generation
// handover), the one attached last takes the connections (the program
// assigns with BPF_SK_LOOKUP_F_REPLACE); when its listener closes, the
// earlier program's listener takes them again.
type VIP struct {
	objs lookupObjects
	link link.Link

	closeOnce sync.Once
	closeErr  error
}

// AttachVIP loads the SK_LOOKUP program, fills its maps and attaches it to the
// network namespace at netnsPath ("" is the calling thread's,
// /proc/thread-self/ns/net). prefixes are the VIP addresses (IPv4 or IPv6),
// ports inclusive [first, last] ranges; listenerFD is a TCP listening socket
// (it is not taken over: the caller still closes it).
//
// Setup is all or nothing: on any error everything loaded so far is closed and
// nothing is attached. Without CAP_BPF/CAP_NET_ADMIN, or on a kernel without
// SK_LOOKUP (5.9+), the error says so; the caller logs it and serves the
// listener's own address only.
func AttachVIP(netnsPath string, prefixes []netip.Prefix, ports [][2]uint16, listenerFD int) (_ *VIP, err error) {
	if len(prefixes) == 0 {
		return nil, errors.New("ebpf: VIP: no prefixes")
	}
	if len(prefixes) > maxVIPPrefixes {
		return nil, fmt.Errorf("ebpf: VIP: %d prefixes, at most %d", len(prefixes), maxVIPPrefixes)
	}
	if len(ports) == 0 {
		return nil, errors.New("ebpf: VIP: no ports")
	}
	bitmap, err := vipPortBitmap(ports)
	if err != nil {
		return nil, err
	}
	keys := make([]lookupLookupKey, len(prefixes))
	for i, p := range prefixes {
		if keys[i], err = vipKey(p); err != nil {
			return nil, err
		}
	}
	if netnsPath == "" {
		netnsPath = "/proc/thread-self/ns/net"
	}
	ns, err := os.Open(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("ebpf: VIP: network namespace: %w", err)
	}
	defer ns.Close()

	v := &VIP{}
	if err := loadLookupObjects(&v.objs, nil); err != nil {
		return nil, fmt.Errorf("ebpf: VIP: load SK_LOOKUP program (needs CAP_BPF and CAP_NET_ADMIN, kernel 5.9+): %w", err)
	}
	defer func() {
		if err != nil {
			v.Close()
		}
	}()

	for i := range keys {
		if err := v.objs.VipPrefixes.Put(&keys[i], uint8(1)); err != nil {
			return nil, fmt.Errorf("ebpf: VIP: prefix %v: %w", prefixes[i], err)
		}
	}
	for i, w := range bitmap {
		if w == 0 {
			continue
		}
		if err := v.objs.VipPorts.Put(uint32(i), w); err != nil {
			return nil, fmt.Errorf("ebpf: VIP: ports: %w", err)
		}
	}
	if err := v.objs.VipSocket.Put(uint32(0), uint64(listenerFD)); err != nil {
		return nil, fmt.Errorf("ebpf: VIP: put listener fd %d in the SOCKMAP (a listening TCP socket, not in a REUSEPORT_SOCKARRAY, MPTCP off): %w", listenerFD, err)
	}
	l, err := link.AttachNetNs(int(ns.Fd()), v.objs.VipLookup)
	if err != nil {
		return nil, fmt.Errorf("ebpf: VIP: attach SK_LOOKUP to %s: %w", netnsPath, err)
	}
	v.link = l
	return v, nil
}

// Close detaches the program and frees its maps; new connections to the VIP
// addresses are then refused (unless something is bound there). Established
// connections are not affected. Safe to call more than once.
func (v *VIP) Close() error {
	v.closeOnce.Do(func() {
		var errs []error
		if v.link != nil {
			errs = append(errs, v.link.Close())
		}
		errs = append(errs, v.objs.Close())
		v.closeErr = errors.Join(errs...)
	})
	return v.closeErr
}

// Counts returns the program's counters summed over CPUs, by result:
// matched, not_vip, no_socket, assign_error.
func (v *VIP) Counts() (map[string]uint64, error) {
	out := make(map[string]uint64, vipCounters)
	for i, name := range vipResults {
		var perCPU []uint64
		if err := v.objs.VipCounters.Lookup(uint32(i), &perCPU); err != nil {
			return nil, fmt.Errorf("ebpf: VIP: counters: %w", err)
		}
		var sum uint64
		for _, n := range perCPU {
			sum += n
		}
		out[name] = sum
	}
	return out, nil
}

var vipLookupsDesc = prometheus.NewDesc(
	"shardgate_vip_lookups_total",
	"SK_LOOKUP VIP dispatch: TCP socket lookups by result (matched: sent to the proxy's listener; not_vip: destination outside the VIP prefixes/ports; no_socket: in the VIP but no listener; assign_error: the kernel refused the listener).",
	[]string{"result"}, nil,
)

// Collector exports the program's counters as shardgate_vip_lookups_total
// {result}. Register it once; it reads the maps at scrape time.
func (v *VIP) Collector() prometheus.Collector { return vipCollector{v} }

type vipCollector struct{ v *VIP }

func (c vipCollector) Describe(ch chan<- *prometheus.Desc) { ch <- vipLookupsDesc }

func (c vipCollector) Collect(ch chan<- prometheus.Metric) {
	counts, err := c.v.Counts()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(vipLookupsDesc, err)
		return
	}
	for _, name := range vipResults {
		ch <- prometheus.MustNewConstMetric(vipLookupsDesc, prometheus.CounterValue, float64(counts[name]), name)
	}
}

// vipKey is p as an LPM trie key: IPv6 as is, IPv4 mapped (::ffff:0:0/96).
func vipKey(p netip.Prefix) (lookupLookupKey, error) {
	if !p.IsValid() {
		return lookupLookupKey{}, fmt.Errorf("ebpf: VIP: invalid prefix %v", p)
	}
	p = p.Masked()
	a, bits := p.Addr(), p.Bits()
	if a.Is4() {
		bits += 96
	} else if a.Is4In6() {
		return lookupLookupKey{}, fmt.Errorf("ebpf: VIP: prefix %v: write IPv4 prefixes as IPv4", p)
	}
	return lookupLookupKey{Prefixlen: uint32(bits), Addr: a.As16()}, nil
}

// vipPortBitmap is ports as the program's bitmap: bit p%64 of word p/64.
func vipPortBitmap(ports [][2]uint16) ([65536 / 64]uint64, error) {
	var bm [65536 / 64]uint64
	for _, r := range ports {
		if r[0] == 0 || r[1] < r[0] {
			return bm, fmt.Errorf("ebpf: VIP: port range %d-%d: want 1 <= first <= last", r[0], r[1])
		}
		for p := uint32(r[0]); p <= uint32(r[1]); p++ {
			bm[p/64] |= 1 << (p % 64)
		}
	}
	return bm, nil
}
