package proxy

import "time"

// tickDuration is the resolution of the timer wheel. CONNECT deadlines, dial
// timeouts and keepalive limits are seconds long; firing up to one tick late
// costs nothing, and a coarse tick lets a connection record "last heard from
// the device" as a 32-bit tick number instead of reading the clock per read.
const tickDuration = 100 * time.Millisecond

// wheelSlots is the number of slots of the wheel: 102.4 s per revolution. A
// deadline further out stays in its slot and is passed over (one compare)
// once per revolution until it is due.
const wheelSlots = 1024

// timer is an entry of the wheel, linked intrusively into its slot's list so
// that adding and removing cost O(1) and nothing is allocated per deadline.
// A conn embeds it as its first field (see connOf).
type timer struct {
	next, prev *timer
	// when is the absolute tick at which the timer fires. Ticks count from
	// the loop's start; 32 bits at 100 ms last 13 years.
	when uint32
}

// armed reports whether t is in a wheel.
func (t *timer) armed() bool { return t.next != nil }

// wheel is a hashed timing wheel (Varghese & Lauck): slot = when mod
// wheelSlots, each slot a circular doubly linked list with a sentinel. It is
// owned by one event loop and not safe for concurrent use.
type wheel struct {
	slots []timer
	// cur is the next tick to be processed: every timer with when < cur has
	// fired.
	cur uint32
	// n counts the armed timers, so an empty wheel lets the loop sleep.
	n int
}

func newWheel(now uint32) *wheel {
	w := &wheel{slots: make([]timer, wheelSlots), cur: now}
	for i := range w.slots {
		s := &w.slots[i]
		s.next, s.prev = s, s
	}
	return w
}

// add arms t to fire at tick when. A tick already processed fires at the next
// advance. t must not be armed.
func (w *wheel) add(t *timer, when uint32) {
	if int32(when-w.cur) < 0 {
		when = w.cur
	}
	t.when = when
	s := &w.slots[when%wheelSlots]
	t.prev, t.next = s.prev, s
	s.prev.next = t
	s.prev = t
	w.n++
}

// remove disarms t; a no-op when it is not armed.
func (w *wheel) remove(t *timer) {
	if t.next == nil {
		return
	}
	t.prev.next, t.next.prev = t.next, t.prev
	t.next, t.prev = nil, nil
	w.n--
}

// reset re-arms t at when, armed or not.
func (w *wheel) reset(t *timer, when uint32) {
	w.remove(t)
	w.add(t, when)
}

// advance processes every tick up to and including now and calls fire for
// each timer due, in order of slot and, within a slot, of arming. A fired
// timer is disarmed before fire runs, so fire may re-arm it or add and remove
// any other timer.
func (w *wheel) advance(now uint32, fire func(*timer)) {
	if int32(now-w.cur) < 0 {
		return
	}
	if w.n == 0 {
		w.cur = now + 1
		return
	}
	steps := min(now-w.cur+1, wheelSlots)
	first := w.cur
	// Timers that fire arms from here on land after now.
	w.cur = now + 1
	var tmp timer
	for i := uint32(0); i < steps; i++ {
		s := &w.slots[(first+i)%wheelSlots]
		if s.next == s {
			continue
		}
		// Move the slot's list to tmp, then take entries off it one by
		// one: a due entry fires, an entry of a later revolution goes
		// back. fire may remove entries still on tmp; they unlink from
		// it like from any list.
		tmp.next, tmp.prev = s.next, s.prev
		tmp.next.prev, tmp.prev.next = &tmp, &tmp
		s.next, s.prev = s, s
		for tmp.next != &tmp {
			t := tmp.next
			t.prev.next, t.next.prev = t.next, t.prev
			t.next, t.prev = nil, nil
			w.n--
			if int32(t.when-now) <= 0 {
				fire(t)
				continue
			}
			// Not due this revolution: back into its slot.
			t.prev, t.next = s.prev, s
			s.prev.next = t
			s.prev = t
			w.n++
		}
	}
}
