package loadgen

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Job kinds.
const (
	KindHold    = "hold"    // connect Count devices, keep them with keepalives for Duration
	KindStorm   = "storm"   // Count devices connect at StartAt, InFlight at a time
	KindChurn   = "churn"   // connect and disconnect at Rate for Duration
	KindLatency = "latency" // Count devices publish at Rate to their own topic, timed to delivery
)

// Job is the work of one process of a fleet; it travels as JSON to an
// agent. Zero values take the defaults noted.
type Job struct {
	Kind   string
	Target string // host:port of a proxy, HAProxy or broker
	// Prefix of the client IDs: device i is Prefix + strconv.Itoa(i), for
	// i in [First, First+Count).
	Prefix       string
	First, Count int
	// Locals are source IPs, given to devices round-robin by index.
	// Default: none (the kernel picks).
	Locals []string
	// Level is mqttwire.Level311 (default, also for 0) or Level5.
	Level     byte
	KeepAlive uint16 // seconds; default 0 (no pings)
	// InFlight bounds connects (and latency publishes) in flight. Default 64.
	InFlight int
	// Retry: a refused or failed connect retries, with exponential backoff
	// from 100ms to 5s and jitter, until it connects or the context ends.
	Retry bool
	// Rate is connects/s (churn) or messages/s (latency). Required there.
	Rate float64
	// Duration is how long hold keeps the devices, storm keeps them after
	// the last one connected, and churn and latency run. Default 0.
	Duration Duration
	// Hold is how long a churned device stays connected. Default 0: it
	// disconnects right after its CONNACK.
	Hold Duration
	QoS  byte // latency: QoS of the publishes and the subscriptions
	// Topic is the latency topic, with {id} replaced by the client ID.
	// Default "loadgen/{id}".
	Topic string
	// Size is the latency payload size in bytes (at least 8: the send
	// time). Default 16.
	Size int
	// StartAt is when the work begins, so agents started one after the
	// other storm together. Default (zero): at once.
	StartAt time.Time
}

// Duration is a time.Duration that is a string ("30s") in JSON.
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var ns int64
		if err2 := json.Unmarshal(b, &ns); err2 != nil {
			return err
		}
		*d = Duration(ns)
		return nil
	}
	v, err := time.ParseDuration(s)
	*d = Duration(v)
	return err
}

// Report is what a job measured. Counts are of devices unless noted.
type Report struct {
	Kind    string
	Devices int // devices the job was for (Count)
	// Connected: successful CONNACKs (churn: every cycle counts).
	Connected int
	// Refused: CONNACKs with a refusal code, every try counted.
	Refused int
	// Failed: tries that ended without a CONNACK (dial error, reset,
	// timeout), every try counted.
	Failed int
	// Lost: connections that ended without being closed by the job.
	Lost int
	// Retries: tries after a device's first.
	Retries int
	// FirstConnect and AllConnected are since StartAt (or the job's
	// start): the first CONNACK and the one that completed Count devices
	// (0 if they never all connected).
	FirstConnect, AllConnected time.Duration
	Elapsed                    time.Duration // the whole job
	Connack                    Percentiles   // CONNACK latency of successful tries
	Latency                    Percentiles   // latency: publish → delivery
	Published, Messages        int           // latency: publishes acknowledged as sent, deliveries
	Errors                     []string      // a few samples
	ConnackHist, LatencyHist   *Histogram    `json:",omitempty"`
}

const maxErrorSamples = 10

// run is the state of one Job in this process.
type run struct {
	j      Job
	locals []netip.Addr
	start  time.Time // StartAt or the job's start

	connected, refused, failed, lost, retries atomic.Int64
	published, messages                       atomic.Int64
	first, all                                atomic.Int64 // ns since start

	mu      sync.Mutex
	connack Histogram
	latency Histogram
	errs    []string
}

// Run runs j in this process and reports what it measured. A job it cannot
// run reports the reason in Errors.
func Run(ctx context.Context, j Job) Report {
	r := &run{j: j}
	if r.j.InFlight <= 0 {
		r.j.InFlight = 64
	}
	if r.j.Topic == "" {
		r.j.Topic = "loadgen/{id}"
	}
	switch {
	case r.j.Size == 0:
		r.j.Size = 16
	case r.j.Size < 8:
		r.j.Size = 8
	}
	for _, s := range j.Locals {
		a, err := netip.ParseAddr(s)
		if err != nil {
			r.errorf("local address %q: %v", s, err)
			return r.report()
		}
		r.locals = append(r.locals, a)
	}
	r.start = time.Now()
	if !j.StartAt.IsZero() {
		select {
		case <-time.After(time.Until(j.StartAt)):
		case <-ctx.Done():
		}
		r.start = j.StartAt
	}
	switch {
	case j.Target == "":
		r.errorf("no target")
	case j.Kind == KindHold || j.Kind == KindStorm:
		r.hold(ctx)
	case j.Kind == KindChurn:
		r.churn(ctx)
	case j.Kind == KindLatency:
		r.latencyJob(ctx)
	default:
		r.errorf("unknown job kind %q", j.Kind)
	}
	return r.report()
}

func (r *run) report() Report {
	r.mu.Lock()
	defer r.mu.Unlock()
	ch, lh := r.connack, r.latency
	rep := Report{
		Kind: r.j.Kind, Devices: r.j.Count,
		Connected: int(r.connected.Load()), Refused: int(r.refused.Load()), Failed: int(r.failed.Load()),
		Lost: int(r.lost.Load()), Retries: int(r.retries.Load()),
		FirstConnect: time.Duration(r.first.Load()), AllConnected: time.Duration(r.all.Load()),
		Published: int(r.published.Load()), Messages: int(r.messages.Load()),
		Errors: r.errs, ConnackHist: &ch, LatencyHist: &lh,
	}
	if !r.start.IsZero() {
		rep.Elapsed = time.Since(r.start)
	}
	rep.Connack, rep.Latency = ch.Percentiles(), lh.Percentiles()
	return rep
}

func (r *run) errorf(format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.errs) < maxErrorSamples && !containsString(r.errs, msg) {
		r.errs = append(r.errs, msg)
	}
}

func containsString(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func (r *run) options(i int) DeviceOptions {
	id := r.j.Prefix + strconv.Itoa(i)
	o := DeviceOptions{
		Level: r.j.Level, ClientID: id, KeepAlive: r.j.KeepAlive, Clean: true,
		OnLost: func(err error) {
			r.lost.Add(1)
			r.errorf("%s lost %s after the start: %v", id, time.Since(r.start).Round(time.Millisecond), err)
		},
	}
	if len(r.locals) > 0 {
		o.Local = r.locals[i%len(r.locals)]
	}
	return o
}

// connect makes one device's tries: one, or with Retry until it connects
// or ctx ends. sem bounds the tries in flight; a device waiting out its
// backoff holds no slot.
func (r *run) connect(ctx context.Context, o DeviceOptions, sem chan struct{}, retry bool) *Device {
	backoff := 100 * time.Millisecond
	for try := 0; ; try++ {
		if try > 0 {
			r.retries.Add(1)
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		d, res, err := Connect(ctx, r.j.Target, o)
		<-sem
		if err == nil {
			r.connected.Add(1)
			r.mu.Lock()
			r.connack.Record(res.Latency)
			r.mu.Unlock()
			since := int64(time.Since(r.start))
			r.first.CompareAndSwap(0, since)
			return d
		}
		if res.Refused {
			r.refused.Add(1)
		} else {
			r.failed.Add(1)
		}
		r.errorf("%s", strings.TrimPrefix(err.Error(), o.ClientID+": "))
		if !retry || ctx.Err() != nil {
			return nil
		}
		// Full jitter on an exponential backoff: refused devices must
		// not come back in lockstep.
		wait := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// connectAll connects Count devices, InFlight at a time.
func (r *run) connectAll(ctx context.Context, retry bool) []*Device {
	devs := make([]*Device, r.j.Count)
	sem := make(chan struct{}, r.j.InFlight)
	var wg sync.WaitGroup
	var done atomic.Int64
	for k := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := r.connect(ctx, r.options(r.j.First+k), sem, retry)
			devs[k] = d
			if d != nil && done.Add(1) == int64(len(devs)) {
				r.all.Store(int64(time.Since(r.start)))
			}
		}()
	}
	wg.Wait()
	return devs
}

// hold is both hold and storm: they differ in their defaults (in-flight,
// retry, duration), which the caller chooses.
func (r *run) hold(ctx context.Context) {
	devs := r.connectAll(ctx, r.j.Retry)
	defer closeAll(devs, r.j.InFlight)
	select {
	case <-time.After(time.Duration(r.j.Duration)):
	case <-ctx.Done():
	}
}

func closeAll(devs []*Device, parallel int) {
	var wg sync.WaitGroup
	ch := make(chan *Device)
	for range max(1, parallel) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range ch {
				_ = d.Close()
			}
		}()
	}
	for _, d := range devs {
		if d != nil {
			ch <- d
		}
	}
	close(ch)
	wg.Wait()
}

// churn starts connects at Rate for Duration; each device disconnects
// after Hold. Client IDs cycle through [First, First+Count) when Count is
// set, else every connect has a new one. A connect that cannot start
// because InFlight are in flight waits, so the achieved rate shows in
// Connected / Elapsed.
func (r *run) churn(ctx context.Context) {
	if r.j.Rate <= 0 {
		r.errorf("churn needs a rate")
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	end := r.start.Add(time.Duration(r.j.Duration))
	sem := make(chan struct{}, r.j.InFlight)
	var wg sync.WaitGroup
	for n := 0; ; n++ {
		at := r.start.Add(time.Duration(float64(n) / r.j.Rate * float64(time.Second)))
		if !at.Before(end) {
			break
		}
		select {
		case <-time.After(time.Until(at)):
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		i := r.j.First + n
		if r.j.Count > 0 {
			i = r.j.First + n%r.j.Count
		}
		o := r.options(i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := r.connect(ctx, o, sem, false)
			if d == nil {
				return
			}
			if r.j.Hold > 0 {
				select {
				case <-time.After(time.Duration(r.j.Hold)):
				case <-ctx.Done():
				}
			}
			_ = d.Close()
		}()
	}
	wg.Wait()
}

// latencyJob connects Count devices; each subscribes to its own topic and
// the job publishes to the devices' topics round-robin at Rate, so every
// message goes device → target → broker → target → device: the delivery
// time is end to end through the target, twice, as a subscriber elsewhere
// would see it. The sending time travels in the payload.
func (r *run) latencyJob(ctx context.Context) {
	if r.j.Rate <= 0 || r.j.Count <= 0 {
		r.errorf("latency needs a rate and devices")
		return
	}
	onMessage := func(m Message) {
		if len(m.Payload) < 8 {
			return
		}
		sent := int64(binary.BigEndian.Uint64(m.Payload))
		r.messages.Add(1)
		r.mu.Lock()
		r.latency.Record(m.At.Sub(time.Unix(0, sent)))
		r.mu.Unlock()
	}
	devs := make([]*Device, r.j.Count)
	topics := make([]string, r.j.Count)
	sem := make(chan struct{}, r.j.InFlight)
	var wg sync.WaitGroup
	for k := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := r.options(r.j.First + k)
			o.OnMessage = onMessage
			d := r.connect(ctx, o, sem, r.j.Retry)
			if d == nil {
				return
			}
			topics[k] = strings.ReplaceAll(r.j.Topic, "{id}", o.ClientID)
			if err := d.Subscribe(topics[k], r.j.QoS); err != nil {
				r.errorf("%v", err)
				_ = d.Close()
				return
			}
			devs[k] = d
		}()
	}
	wg.Wait()
	defer closeAll(devs, r.j.InFlight)
	var live []int
	for k, d := range devs {
		if d != nil {
			live = append(live, k)
		}
	}
	if len(live) == 0 {
		return
	}
	r.all.Store(int64(time.Since(r.start)))

	// Publishers: InFlight goroutines fed by a pacer, so a QoS 1/2 flow
	// waiting for its acknowledgement does not hold the pace back.
	work := make(chan int, r.j.InFlight)
	var pw sync.WaitGroup
	for range r.j.InFlight {
		pw.Add(1)
		go func() {
			defer pw.Done()
			payload := make([]byte, r.j.Size)
			for k := range work {
				binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
				if err := devs[k].Publish(topics[k], r.j.QoS, payload); err != nil {
					r.errorf("%v", err)
					continue
				}
				r.published.Add(1)
			}
		}()
	}
	pubStart := time.Now()
	end := pubStart.Add(time.Duration(r.j.Duration))
pace:
	for n := 0; ; n++ {
		at := pubStart.Add(time.Duration(float64(n) / r.j.Rate * float64(time.Second)))
		if !at.Before(end) {
			break
		}
		if d := time.Until(at); d > 0 {
			select {
			case <-time.After(d):
			case <-ctx.Done():
				break pace
			}
		}
		select {
		case work <- live[n%len(live)]:
		case <-ctx.Done():
			break pace
		}
	}
	close(work)
	pw.Wait()
	// Deliveries still on their way: wait until each publish arrived (QoS
	// 0 may drop some) or a quiet second passes.
	last, quiet := r.messages.Load(), time.Now()
	for r.messages.Load() < r.published.Load() && time.Since(quiet) < time.Second && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
		if m := r.messages.Load(); m != last {
			last, quiet = m, time.Now()
		}
	}
}

// Merge adds up the reports of the agents of one fleet: counts are summed,
// FirstConnect is the earliest, AllConnected the latest (0 if one agent's
// devices never all connected), percentiles come from the merged
// histograms.
func Merge(rs []Report) Report {
	var m Report
	var ch, lh Histogram
	allDone := true
	for i, r := range rs {
		if i == 0 {
			m.Kind = r.Kind
		}
		m.Devices += r.Devices
		m.Connected += r.Connected
		m.Refused += r.Refused
		m.Failed += r.Failed
		m.Lost += r.Lost
		m.Retries += r.Retries
		m.Published += r.Published
		m.Messages += r.Messages
		if r.FirstConnect > 0 && (m.FirstConnect == 0 || r.FirstConnect < m.FirstConnect) {
			m.FirstConnect = r.FirstConnect
		}
		if r.AllConnected == 0 && r.Devices > 0 {
			allDone = false
		}
		m.AllConnected = max(m.AllConnected, r.AllConnected)
		m.Elapsed = max(m.Elapsed, r.Elapsed)
		for _, e := range r.Errors {
			if len(m.Errors) < maxErrorSamples && !containsString(m.Errors, e) {
				m.Errors = append(m.Errors, e)
			}
		}
		ch.Add(r.ConnackHist)
		lh.Add(r.LatencyHist)
	}
	if !allDone {
		m.AllConnected = 0
	}
	m.ConnackHist, m.LatencyHist = &ch, &lh
	m.Connack, m.Latency = ch.Percentiles(), lh.Percentiles()
	return m
}
