package main

import (
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shardgate/shardgate/mqttwire"
)

// cmpMetrics are one run's figures of one target, by name.
type cmpMetrics map[string]float64

// cmpFigure is one measurement of `bench compare`.
type cmpFigure struct {
	key, name string
	// proxyOnly figures have nothing to measure without a proxy.
	proxyOnly bool
	run       func(e *cmpEnv, t *cmpTarget, cfg *compareConfig, run int) (cmpMetrics, error)
	// runAll, when set instead of run, measures every target in one go,
	// their work interleaved, and returns the figures by target name.
	runAll func(e *cmpEnv, cfg *compareConfig, run int) (map[string]cmpMetrics, error)
}

var compareFigures = []cmpFigure{
	{key: "connect", name: "connect CPU", runAll: figConnectCPU},
	{key: "messages", name: "message CPU", run: figMessageCPU},
	{key: "idle", name: "idle memory", proxyOnly: true, run: figIdleMemory},
	{key: "latency", name: "ping-pong latency", runAll: figLatency},
	{key: "storm", name: "connect storm", run: figStorm},
}

// figConnectCPU: devices do CONNECT→CONNACK→DISCONNECT, a few in flight;
// the proxy's and the brokers' CPU per 1000 connects. The targets take
// turns in cmpConnectParts parts of the connects, so drift of the shared
// machine over the figure's seconds spreads over all of them.
func figConnectCPU(e *cmpEnv, cfg *compareConfig, run int) (map[string]cmpMetrics, error) {
	type sum struct {
		proxy, proxySys, broker, elapsed time.Duration
		ok, failed                       int
	}
	sums := make([]sum, len(e.targets))
	pids := e.brokerPids()
	parts := cfg.connectParts()
	for part := range parts {
		from, to := cfg.connects*part/parts, cfg.connects*(part+1)/parts
		for ti, t := range e.targets {
			c0, err := sampleCmpCPU(t.pid, pids)
			if err != nil {
				return nil, err
			}
			start := time.Now()
			failed, first := forEach(to-from, cfg.connectInflight, func(i int) error {
				id := fmt.Sprintf("cmp-c%d-%s-%d", run, t.name, from+i)
				c, err := cmpConnect(e.addr(t, id), id)
				if err != nil {
					return err
				}
				c.disconnect()
				return nil
			})
			elapsed := time.Since(start)
			if failed > (to-from)/100 {
				return nil, fmt.Errorf("%s: %d of %d connects failed: %w", t.name, failed, to-from, first)
			}
			// The CPU of the closes counts too: wait until the proxy
			// has done them.
			if err := e.quiesce(t); err != nil {
				return nil, err
			}
			c1, err := sampleCmpCPU(t.pid, pids)
			if err != nil {
				return nil, err
			}
			s := &sums[ti]
			s.proxy += c1.proxy - c0.proxy
			s.proxySys += c1.proxySys - c0.proxySys
			s.broker += c1.broker - c0.broker
			s.elapsed += elapsed
			s.ok += to - from - failed
			s.failed += failed
		}
	}
	out := make(map[string]cmpMetrics, len(e.targets))
	for ti, t := range e.targets {
		s, ok := sums[ti], float64(sums[ti].ok)
		m := cmpMetrics{
			"broker_ms": ms(s.broker) * 1000 / ok,
			"rate":      ok / s.elapsed.Seconds(),
			"failed":    float64(s.failed),
		}
		if t.pid != 0 {
			m["proxy_ms"] = ms(s.proxy) * 1000 / ok
			m["proxy_sys_ms"] = ms(s.proxySys) * 1000 / ok
		}
		out[t.name] = m
	}
	return out, nil
}

// connectParts is how many turns each target takes in the connect figure:
// five, or fewer to keep at least 100 connects in a turn. CPU is read in
// 10 ms ticks, so a turn must last tens of them.
func (cfg *compareConfig) connectParts() int { return max(1, min(5, cfg.connects/100)) }

// figMessageCPU: devices each publish on their own topic and are
// subscribed to it, all through the target, paced to a fixed total rate;
// CPU per 100k messages, and the messages counted as they come back. A
// message crosses the proxy twice, in and out, as between a publisher and a
// subscriber; one device is both because brokers are shards that share no
// messages, and HAProxy's hash decides which broker a device lands on.
func figMessageCPU(e *cmpEnv, t *cmpTarget, cfg *compareConfig, run int) (cmpMetrics, error) {
	n := cfg.msgPublishers
	pubs := make([]*cmpConn, n)
	defer func() {
		for _, c := range pubs {
			if c != nil {
				c.disconnect()
			}
		}
	}()
	topic := func(i int) string { return fmt.Sprintf("cmp/m%d/%s/%d", run, t.name, i) }
	if _, err := forEach(n, 16, func(i int) error {
		id := fmt.Sprintf("cmp-m%d-%s-%d", run, t.name, i)
		c, err := cmpConnect(e.addr(t, id), id)
		if err != nil {
			return err
		}
		pubs[i] = c
		return c.subscribe(topic(i))
	}); err != nil {
		return nil, fmt.Errorf("devices: %w", err)
	}

	var received atomic.Int64
	for _, c := range pubs {
		go countPublishes(c, &received)
	}
	pids := e.brokerPids()
	c0, err := sampleCmpCPU(t.pid, pids)
	if err != nil {
		return nil, err
	}
	perPub := int(float64(cfg.msgRate) * cfg.msgTime.Seconds() / float64(n))
	interval := time.Duration(float64(time.Second) * float64(n) / float64(cfg.msgRate))
	var sent atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	errs := make(chan error, n)
	for i, c := range pubs {
		wg.Add(1)
		// Publishers are staggered over one interval so the total rate is
		// even, not bursts of n messages.
		go func() {
			defer wg.Done()
			errs <- publishPaced(c, topic(i), perPub, start.Add(interval*time.Duration(i)/time.Duration(n)), interval, &sent)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		if err != nil {
			return nil, fmt.Errorf("publish: %w", err)
		}
	}
	total := sent.Load()
	for deadline := time.Now().Add(10 * time.Second); received.Load() < total && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	c1, err := sampleCmpCPU(t.pid, pids)
	if err != nil {
		return nil, err
	}
	got := received.Load()
	if got < total*99/100 {
		return nil, fmt.Errorf("%d of %d messages arrived", got, total)
	}
	m := cmpMetrics{
		"broker_s":  ms(c1.broker-c0.broker) / 1000 * 100000 / float64(total),
		"rate":      float64(total) / elapsed.Seconds(),
		"delivered": 100 * float64(got) / float64(total),
	}
	if t.pid != 0 {
		m["proxy_s"] = ms(c1.proxy-c0.proxy) / 1000 * 100000 / float64(total)
		m["proxy_sys_s"] = ms(c1.proxySys-c0.proxySys) / 1000 * 100000 / float64(total)
	}
	return m, nil
}

// publishPaced publishes count messages on topic, message k due at
// first + k×interval; a late publisher catches up at once, so the total
// stays at the rate.
func publishPaced(c *cmpConn, topic string, count int, first time.Time, interval time.Duration, sent *atomic.Int64) error {
	payload := make([]byte, 64)
	var pkt []byte
	for k := range count {
		if d := time.Until(first.Add(interval * time.Duration(k))); d > 0 {
			time.Sleep(d)
		}
		copy(payload, strconv.Itoa(k))
		pkt = appendPublish(pkt[:0], topic, payload)
		_ = c.SetWriteDeadline(time.Now().Add(cmpIOTimeout))
		if _, err := c.Write(pkt); err != nil {
			return err
		}
		sent.Add(1)
	}
	return nil
}

func countPublishes(c *cmpConn, n *atomic.Int64) {
	var buf []byte
	for {
		typ, body, err := c.readPacket(buf)
		if err != nil {
			return
		}
		buf = body[:0]
		if typ == mqttwire.PUBLISH {
			n.Add(1)
		}
	}
}

// figIdleMemory holds idle devices in steps and reads the proxy's RSS and
// fds at each (after a GC for shardgate); per connection is the slope
// against the first step. Each run measures a newly started proxy, as a
// device fleet meets it after a restart.
func figIdleMemory(e *cmpEnv, t *cmpTarget, cfg *compareConfig, run int) (cmpMetrics, error) {
	t, stop, err := e.fresh(t)
	if err != nil {
		return nil, err
	}
	defer stop()
	var held []*cmpConn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	m := cmpMetrics{}
	var rss0, anon0 int64
	var fds0 int
	for si, n := range cfg.idleSteps {
		if more := n - len(held); more > 0 {
			conns := make([]*cmpConn, more)
			base := len(held)
			_, err := forEach(more, cfg.idleParallel, func(i int) error {
				id := fmt.Sprintf("cmp-i%d-%s-%d", run, t.name, base+i)
				c, err := cmpConnect(e.addr(t, id), id)
				conns[i] = c
				return err
			})
			for _, c := range conns {
				if c != nil {
					held = append(held, c)
				}
			}
			if err != nil {
				return nil, fmt.Errorf("at %d idle devices: %w", len(held), err)
			}
		}
		if t.admin != "" {
			if err := forceGC(t.admin); err != nil {
				return nil, err
			}
		}
		time.Sleep(cfg.settle)
		rss, anon, err := procMem(t.pid)
		if err != nil {
			return nil, err
		}
		fds, err := procFds(t.pid)
		if err != nil {
			return nil, err
		}
		k := strconv.Itoa(n)
		m["rss_kib@"+k] = float64(rss) / 1024
		m["fds@"+k] = float64(fds)
		if si == 0 {
			rss0, anon0, fds0 = rss, anon, fds
			continue
		}
		d := float64(n - cfg.idleSteps[0])
		m["rss@"+k] = float64(rss-rss0) / d
		m["anon@"+k] = float64(anon-anon0) / d
		m["fdsper@"+k] = float64(fds-fds0) / d
	}
	return m, nil
}

// figLatency: devices each publish to their own topic and wait for the
// message to come back through the same target, paced to a light rate per
// target; percentiles of the round trip. The targets take turns ping by
// ping, one round trip at a time, so a burst of noise on a shared machine
// (a stolen core, a host's timer) lands on each of them alike instead of
// on whichever had the machine to itself for that half minute.
func figLatency(e *cmpEnv, cfg *compareConfig, run int) (map[string]cmpMetrics, error) {
	k, nt := cfg.pingDevices, len(e.targets)
	interval := time.Duration(float64(time.Second) / float64(cfg.pingRate*nt))
	count := int(cfg.pingTime / interval)
	pingers := make([][]*pinger, nt)
	defer func() {
		for _, ps := range pingers {
			for _, p := range ps {
				p.c.disconnect()
			}
		}
	}()
	for ti, t := range e.targets {
		for i := range k {
			id := fmt.Sprintf("cmp-l%d-%s-%d", run, t.name, i)
			c, err := cmpConnect(e.addr(t, id), id)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", t.name, err)
			}
			p := &pinger{c: c, topic: "cmp/l/" + id, payload: make([]byte, 32)}
			pingers[ti] = append(pingers[ti], p)
			if err := c.subscribe(p.topic); err != nil {
				return nil, fmt.Errorf("%s: %w", t.name, err)
			}
		}
	}
	samples := make([][]time.Duration, nt)
	first := time.Now()
	for s := range count {
		if d := time.Until(first.Add(interval * time.Duration(s))); d > 0 {
			time.Sleep(d)
		}
		ti := s % nt
		rtt, err := pingers[ti][(s/nt)%k].ping(s)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", e.targets[ti].name, err)
		}
		samples[ti] = append(samples[ti], rtt)
	}
	out := make(map[string]cmpMetrics, nt)
	for ti, t := range e.targets {
		sortDurations(samples[ti])
		out[t.name] = cmpMetrics{
			"p50":     ms(percentile(samples[ti], 50)),
			"p90":     ms(percentile(samples[ti], 90)),
			"p99":     ms(percentile(samples[ti], 99)),
			"p999":    ms(percentile(samples[ti], 99.9)),
			"samples": float64(len(samples[ti])),
		}
	}
	return out, nil
}

// pinger is a device of the latency figure, subscribed to its own topic.
type pinger struct {
	c        *cmpConn
	topic    string
	payload  []byte
	pkt, buf []byte
}

// ping publishes seq to the pinger's topic and returns the time until the
// message comes back.
func (p *pinger) ping(seq int) (time.Duration, error) {
	ss := strconv.Itoa(seq)
	copy(p.payload, ss)
	clear(p.payload[len(ss):])
	p.pkt = appendPublish(p.pkt[:0], p.topic, p.payload)
	_ = p.c.SetDeadline(time.Now().Add(cmpIOTimeout))
	sentAt := time.Now()
	if _, err := p.c.Write(p.pkt); err != nil {
		return 0, err
	}
	for {
		typ, body, err := p.c.readPacket(p.buf)
		if err != nil {
			return 0, fmt.Errorf("ping %d: %w", seq, err)
		}
		p.buf = body[:0]
		if b := publishPayload(body); typ == mqttwire.PUBLISH && len(b) >= len(ss) && string(b[:len(ss)]) == ss && (len(b) == len(ss) || b[len(ss)] == 0) {
			return time.Since(sentAt), nil
		}
	}
}

// figStorm: devices connect at once, many in flight, and stay; the time
// from dial to CONNACK of each.
func figStorm(e *cmpEnv, t *cmpTarget, cfg *compareConfig, run int) (cmpMetrics, error) {
	conns := make([]*cmpConn, cfg.storm)
	lat := make([]time.Duration, cfg.storm)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	start := time.Now()
	failed, first := forEach(cfg.storm, cfg.stormInflight, func(i int) error {
		id := fmt.Sprintf("cmp-s%d-%s-%d", run, t.name, i)
		t0 := time.Now()
		c, err := cmpConnect(e.addr(t, id), id)
		if err != nil {
			return err
		}
		lat[i], conns[i] = time.Since(t0), c
		return nil
	})
	total := time.Since(start)
	if failed > cfg.storm/100 {
		return nil, fmt.Errorf("%d of %d devices failed to connect: %w", failed, cfg.storm, first)
	}
	ok := lat[:0:0]
	for i, c := range conns {
		if c != nil {
			ok = append(ok, lat[i])
		}
	}
	sortDurations(ok)
	return cmpMetrics{
		"p50":     ms(percentile(ok, 50)),
		"p99":     ms(percentile(ok, 99)),
		"max":     ms(slices.Max(ok)),
		"total_s": total.Seconds(),
		"failed":  float64(failed),
	}, nil
}

// cpuSample is the proxy's CPU (zero without a proxy), the kernel's part
// of it, and the brokers' sum, at one moment.
type cpuSample struct{ proxy, proxySys, broker time.Duration }

func sampleCmpCPU(pid int, brokers []int) (c cpuSample, err error) {
	if pid != 0 {
		user, sys, err := procTimes(pid)
		if err != nil {
			return c, err
		}
		c.proxy, c.proxySys = user+sys, sys
	}
	c.broker, err = cpuOf(brokers)
	return c, err
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
