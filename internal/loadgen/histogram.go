package loadgen

import (
	"encoding/json"
	"math"
	"math/bits"
	"time"
)

// Histogram counts durations in log-linear buckets: exact below 128 ns,
// then 64 buckets per power of two, so a percentile read from it is within
// 1.6% of the true sample. Histograms of separate processes merge exactly
// (Add), which raw percentiles do not. The zero value is empty and ready.
type Histogram struct {
	counts []int64
	n      int64
	max    time.Duration
}

const histSub = 64 // buckets per power of two

func histIndex(v int64) int {
	if v < 2*histSub {
		return int(v)
	}
	shift := bits.Len64(uint64(v)) - 7 // ≥ 1
	sub := int(v >> shift)             // in [64, 128)
	return 2*histSub + (shift-1)*histSub + (sub - histSub)
}

// histValue is the middle of bucket i.
func histValue(i int) int64 {
	if i < 2*histSub {
		return int64(i)
	}
	shift := (i-2*histSub)/histSub + 1
	sub := int64((i-2*histSub)%histSub + histSub)
	return sub<<shift + (int64(1)<<shift)/2
}

// Record adds one sample; negative samples count as 0.
func (h *Histogram) Record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	i := histIndex(int64(d))
	if i >= len(h.counts) {
		h.counts = append(h.counts, make([]int64, i+1-len(h.counts))...)
	}
	h.counts[i]++
	h.n++
	h.max = max(h.max, d)
}

// Add merges o into h.
func (h *Histogram) Add(o *Histogram) {
	if o == nil {
		return
	}
	if len(o.counts) > len(h.counts) {
		h.counts = append(h.counts, make([]int64, len(o.counts)-len(h.counts))...)
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// Count is the number of samples.
func (h *Histogram) Count() int64 { return h.n }

// Quantile is the sample at quantile q (0..1): the middle of the bucket of
// the ceil(q·n)-th smallest sample, never above the exact maximum.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := int64(math.Ceil(q * float64(h.n)))
	rank = max(1, min(rank, h.n))
	var seen int64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(time.Duration(histValue(i)), h.max)
		}
	}
	return h.max
}

// Percentiles summarizes h.
func (h *Histogram) Percentiles() Percentiles {
	if h == nil {
		return Percentiles{}
	}
	return Percentiles{N: h.n, P50: h.Quantile(0.50), P90: h.Quantile(0.90), P99: h.Quantile(0.99), P999: h.Quantile(0.999), Max: h.max}
}

type histJSON struct {
	N       int64      `json:"n"`
	Max     int64      `json:"max_ns"`
	Buckets [][2]int64 `json:"buckets"` // [bucket index, count], non-empty buckets only
}

func (h *Histogram) MarshalJSON() ([]byte, error) {
	j := histJSON{N: h.n, Max: int64(h.max), Buckets: [][2]int64{}}
	for i, c := range h.counts {
		if c != 0 {
			j.Buckets = append(j.Buckets, [2]int64{int64(i), c})
		}
	}
	return json.Marshal(j)
}

func (h *Histogram) UnmarshalJSON(b []byte) error {
	var j histJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*h = Histogram{n: j.N, max: time.Duration(j.Max)}
	for _, bc := range j.Buckets {
		i := int(bc[0])
		if i < 0 || i > histIndex(math.MaxInt64) {
			continue
		}
		if i >= len(h.counts) {
			h.counts = append(h.counts, make([]int64, i+1-len(h.counts))...)
		}
		h.counts[i] += bc[1]
	}
	return nil
}

// Percentiles of a set of durations. N is the number of samples.
type Percentiles struct {
	N                        int64
	P50, P90, P99, P999, Max time.Duration
}
