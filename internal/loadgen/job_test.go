package loadgen

import (
	"context"
	"encoding/json"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
)

func TestHistogramQuantiles(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var samples []time.Duration
	var h, a, b Histogram
	for i := range 20000 {
		d := time.Duration(rng.ExpFloat64() * float64(300*time.Microsecond))
		if i%1000 == 0 {
			d = time.Duration(rng.IntN(100)) // exact range
		}
		samples = append(samples, d)
		h.Record(d)
		if i%2 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
	}
	slices.Sort(samples)
	for _, q := range []float64{0, 0.01, 0.5, 0.9, 0.99, 0.999, 1} {
		rank := max(1, int(math.Ceil(q*float64(len(samples)))))
		want := samples[rank-1]
		got := h.Quantile(q)
		if math.Abs(float64(got-want)) > float64(want)/64+1 {
			t.Errorf("q%v: got %v, want %v within 1/64", q, got, want)
		}
	}
	if got := h.Percentiles().Max; got != samples[len(samples)-1] {
		t.Errorf("max %v, want %v", got, samples[len(samples)-1])
	}

	// Merged halves and a JSON round trip give the same answers as the
	// whole: agents' reports merge without loss.
	var merged Histogram
	for _, part := range []*Histogram{&a, &b} {
		raw, err := json.Marshal(part)
		if err != nil {
			t.Fatal(err)
		}
		var back Histogram
		if err := json.Unmarshal(raw, &back); err != nil {
			t.Fatal(err)
		}
		merged.Add(&back)
	}
	if got, want := merged.Percentiles(), h.Percentiles(); got != want {
		t.Fatalf("merged %+v, whole %+v", got, want)
	}
}

func TestMerge(t *testing.T) {
	var h1, h2 Histogram
	h1.Record(time.Millisecond)
	h2.Record(3 * time.Millisecond)
	m := Merge([]Report{
		{Kind: KindStorm, Devices: 10, Connected: 10, Refused: 2, Retries: 2, FirstConnect: 5 * time.Millisecond, AllConnected: 50 * time.Millisecond, ConnackHist: &h1, Errors: []string{"a"}},
		{Kind: KindStorm, Devices: 10, Connected: 9, Failed: 1, FirstConnect: 3 * time.Millisecond, AllConnected: 0, ConnackHist: &h2, Errors: []string{"a", "b"}},
	})
	if m.Devices != 20 || m.Connected != 19 || m.Refused != 2 || m.Failed != 1 || m.Retries != 2 {
		t.Fatalf("counts: %+v", m)
	}
	if m.FirstConnect != 3*time.Millisecond || m.AllConnected != 0 {
		t.Fatalf("first %v all %v: want 3ms and 0 (one agent never completed)", m.FirstConnect, m.AllConnected)
	}
	if m.Connack.N != 2 || m.Connack.Max != 3*time.Millisecond || !slices.Equal(m.Errors, []string{"a", "b"}) {
		t.Fatalf("connack %+v errors %v", m.Connack, m.Errors)
	}
}

// TestRunJobs runs each job kind small against a real Mosquitto and checks
// the report adds up.
func TestRunJobs(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	ctx := context.Background()

	t.Run("hold", func(t *testing.T) {
		r := Run(ctx, Job{Kind: KindHold, Target: m.String(), Prefix: "hold-", Count: 100, KeepAlive: 1,
			Duration: Duration(2500 * time.Millisecond), Locals: []string{"127.0.0.2", "127.0.0.3"}})
		if r.Connected != 100 || r.Lost != 0 || r.Failed != 0 || r.Refused != 0 || r.Connack.N != 100 || r.AllConnected <= 0 || r.FirstConnect > r.AllConnected {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("storm-at", func(t *testing.T) {
		start := time.Now().Add(300 * time.Millisecond)
		r := Run(ctx, Job{Kind: KindStorm, Target: m.String(), Prefix: "storm-", Count: 200, InFlight: 16, StartAt: start})
		if time.Since(start) < 0 {
			t.Fatal("ran before StartAt")
		}
		if r.Connected != 200 || r.Connack.N != 200 || r.AllConnected < r.FirstConnect {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("churn", func(t *testing.T) {
		r := Run(ctx, Job{Kind: KindChurn, Target: m.String(), Prefix: "churn-", Count: 10, Rate: 100, Duration: Duration(time.Second)})
		// Connects start at n/rate for n/rate < 1s: exactly 100.
		if r.Connected != 100 || r.Failed != 0 || r.Lost != 0 || r.Connack.N != 100 {
			t.Fatalf("%+v", r)
		}
	})
	for _, qos := range []byte{0, 1, 2} {
		t.Run("latency-qos"+string('0'+qos), func(t *testing.T) {
			r := Run(ctx, Job{Kind: KindLatency, Target: m.String(), Prefix: "lat-", Count: 5, Rate: 200, QoS: qos,
				Duration: Duration(time.Second), Topic: "devices/{id}/telemetry"})
			if r.Published == 0 || r.Messages != r.Published || r.Latency.N != int64(r.Messages) || r.Latency.P50 <= 0 || len(r.Errors) != 0 {
				t.Fatalf("%+v", r)
			}
		})
	}
	t.Run("bad-target", func(t *testing.T) {
		r := Run(ctx, Job{Kind: KindHold, Target: "127.0.0.1:1", Count: 3})
		if r.Connected != 0 || r.Failed != 3 || len(r.Errors) == 0 {
			t.Fatalf("%+v", r)
		}
	})
}
