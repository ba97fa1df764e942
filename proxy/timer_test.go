package proxy

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// fired collects the timers a wheel fires, by index into ts.
func firedOf(ts []timer) (*[]int, func(*timer)) {
	var got []int
	return &got, func(t *timer) {
		for i := range ts {
			if &ts[i] == t {
				got = append(got, i)
				return
			}
		}
		panic("fired a timer that is not ours")
	}
}

func TestWheelExpiryOrder(t *testing.T) {
	w := newWheel(0)
	ts := make([]timer, 6)
	got, fire := firedOf(ts)
	// Armed out of order; timers due at the same tick fire in arming order.
	w.add(&ts[0], 5)
	w.add(&ts[1], 3)
	w.add(&ts[2], 5)
	w.add(&ts[3], 1)
	w.add(&ts[4], 7)
	w.add(&ts[5], 3)
	if w.n != 6 {
		t.Fatalf("n = %d, want 6", w.n)
	}
	w.advance(0, fire)
	if len(*got) != 0 {
		t.Fatalf("fired %v at tick 0", *got)
	}
	w.advance(3, fire)
	if want := []int{3, 1, 5}; !slices.Equal(*got, want) {
		t.Fatalf("by tick 3 fired %v, want %v", *got, want)
	}
	w.advance(6, fire)
	if want := []int{3, 1, 5, 0, 2}; !slices.Equal(*got, want) {
		t.Fatalf("by tick 6 fired %v, want %v", *got, want)
	}
	w.advance(7, fire)
	if want := []int{3, 1, 5, 0, 2, 4}; !slices.Equal(*got, want) {
		t.Fatalf("by tick 7 fired %v, want %v", *got, want)
	}
	if w.n != 0 {
		t.Fatalf("n = %d after all fired", w.n)
	}
	for i := range ts {
		if ts[i].armed() {
			t.Fatalf("timer %d still armed after firing", i)
		}
	}
}

func TestWheelRemoveAndReset(t *testing.T) {
	w := newWheel(10)
	ts := make([]timer, 3)
	got, fire := firedOf(ts)
	w.add(&ts[0], 12)
	w.add(&ts[1], 12)
	w.add(&ts[2], 12)
	w.remove(&ts[1])
	w.remove(&ts[1]) // not armed: no-op
	if w.n != 2 || ts[1].armed() {
		t.Fatalf("after remove: n=%d armed=%v", w.n, ts[1].armed())
	}
	w.reset(&ts[0], 20) // reschedule later
	w.reset(&ts[1], 11) // arm a disarmed one
	w.advance(12, fire)
	if want := []int{1, 2}; !slices.Equal(*got, want) {
		t.Fatalf("by tick 12 fired %v, want %v", *got, want)
	}
	w.advance(19, fire)
	if len(*got) != 2 {
		t.Fatalf("fired early: %v", *got)
	}
	w.advance(20, fire)
	if want := []int{1, 2, 0}; !slices.Equal(*got, want) {
		t.Fatalf("by tick 20 fired %v, want %v", *got, want)
	}
}

func TestWheelPastDeadlineFiresNext(t *testing.T) {
	w := newWheel(0)
	w.advance(50, func(*timer) {})
	var tm timer
	w.add(&tm, 3) // already past: fires at the next advance
	n := 0
	w.advance(51, func(x *timer) {
		if x != &tm {
			t.Fatal("fired a stranger")
		}
		n++
	})
	if n != 1 {
		t.Fatalf("past deadline fired %d times, want 1", n)
	}
}

// A deadline further out than one revolution stays put until due.
func TestWheelLongDeadline(t *testing.T) {
	w := newWheel(0)
	var tm timer
	w.add(&tm, 3*wheelSlots+7)
	fired := 0
	for now := uint32(0); now < 3*wheelSlots+7; now += 13 {
		w.advance(now, func(*timer) { fired++ })
	}
	if fired != 0 {
		t.Fatal("long deadline fired early")
	}
	w.advance(3*wheelSlots+7, func(*timer) { fired++ })
	if fired != 1 {
		t.Fatalf("long deadline fired %d times, want 1", fired)
	}
}

// After a long sleep (no advance for many revolutions) everything due fires
// once, and nothing not due.
func TestWheelBigJump(t *testing.T) {
	w := newWheel(0)
	ts := make([]timer, 100)
	for i := range ts {
		w.add(&ts[i], uint32(i*50))
	}
	n := 0
	w.advance(2500, func(*timer) { n++ })
	if n != 51 { // whens 0, 50, ..., 2500
		t.Fatalf("fired %d, want 51", n)
	}
	w.advance(10000, func(*timer) { n++ })
	if n != 100 || w.n != 0 {
		t.Fatalf("fired %d (n=%d), want 100", n, w.n)
	}
}

// fire may re-arm its own timer (the keepalive does), remove timers still
// waiting in the same slot, and add new ones.
func TestWheelFireMutates(t *testing.T) {
	w := newWheel(0)
	ts := make([]timer, 4)
	w.add(&ts[0], 5)
	w.add(&ts[1], 5)
	w.add(&ts[2], 5)
	var order []int
	idx := func(x *timer) int {
		for i := range ts {
			if &ts[i] == x {
				return i
			}
		}
		return -1
	}
	w.advance(5, func(x *timer) {
		i := idx(x)
		order = append(order, i)
		switch i {
		case 0:
			w.remove(&ts[1])   // still on the list being fired
			w.add(&ts[3], 4)   // in the past: next advance
			w.add(&ts[0], 5+3) // re-arm itself
		}
	})
	if want := []int{0, 2}; !slices.Equal(order, want) {
		t.Fatalf("fired %v, want %v", order, want)
	}
	order = nil
	w.advance(6, func(x *timer) { order = append(order, idx(x)) })
	if want := []int{3}; !slices.Equal(order, want) {
		t.Fatalf("next tick fired %v, want %v", order, want)
	}
	order = nil
	w.advance(8, func(x *timer) { order = append(order, idx(x)) })
	if want := []int{0}; !slices.Equal(order, want) {
		t.Fatalf("re-armed timer: fired %v, want %v", order, want)
	}
	if w.n != 0 {
		t.Fatalf("n = %d", w.n)
	}
}

// Random operations against a simple model: each timer fires exactly once,
// at its deadline's tick, unless removed.
func TestWheelRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	w := newWheel(0)
	ts := make([]timer, 500)
	index := make(map[*timer]int, len(ts))
	for i := range ts {
		index[&ts[i]] = i
	}
	want := map[int]uint32{} // armed: index → when
	now := uint32(0)
	for step := 0; step < 20000; step++ {
		i := r.IntN(len(ts))
		switch r.IntN(4) {
		case 0, 1:
			when := now + 1 + uint32(r.IntN(3*wheelSlots))
			w.reset(&ts[i], when)
			want[i] = when
		case 2:
			w.remove(&ts[i])
			delete(want, i)
		case 3:
			now += uint32(r.IntN(40))
			w.advance(now, func(x *timer) {
				j := index[x]
				when, ok := want[j]
				if !ok {
					t.Fatalf("timer %d fired but is not armed", j)
				}
				if when > now {
					t.Fatalf("timer %d due %d fired at %d", j, when, now)
				}
				delete(want, j)
			})
			for j, when := range want {
				if when <= now {
					t.Fatalf("timer %d due %d not fired by %d", j, when, now)
				}
			}
		}
		if w.n != len(want) {
			t.Fatalf("step %d: n=%d, model %d", step, w.n, len(want))
		}
	}
}
