package broker

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Bus carries publishes between the broker instances of one fleet, so that
// the fleet behaves as one broker to devices: a message published on one
// instance reaches the matching subscribers on every other instance.
//
// Routes are kept per instance, not per shard: during a drain one shard's
// devices sit on two instances. An instance announces a route when its first
// local subscription to a filter appears and withdraws it when the last one
// goes; the bus sends a message only to instances with a matching route (and,
// for retained messages, stores it on every instance).
//
// LocalBus is the in-process implementation used by the embedded fleet; a
// networked implementation (Redis) fills the same contract.
type Bus interface {
	// Join adds an instance to the fleet; r receives what the bus routes to it.
	Join(instance string, r Receiver) error
	// Leave removes an instance and its routes. Nothing is delivered to it,
	// and nothing it publishes is forwarded, once Leave has returned.
	Leave(instance string) error
	// AddRoute records that instance has at least one local subscription to
	// filter (a topic filter, or a shared "$share/{group}/{filter}").
	AddRoute(instance, filter string) error
	// RemoveRoute withdraws the route: instance has no subscription to filter
	// left.
	RemoveRoute(instance, filter string) error
	// Publish forwards a PUBLISH that arrived on origin (from a device, or a
	// will message) after origin has delivered it to its own plain
	// subscribers. Every other instance with a matching route gets one
	// Delivery; each shared subscription group matching the topic gets the
	// message once, fleet-wide, on one instance that holds members of the
	// group (origin included). A retained message is stored on every
	// instance, in one fleet-wide order.
	Publish(origin string, pk packets.Packet) error
}

// Receiver is the bus's view of one broker instance.
type Receiver interface {
	// Deliver publishes d.Packet into the instance as a local publish would,
	// restricted as the Delivery says. The packet's slices are shared with
	// other receivers and must not be modified.
	Deliver(d Delivery) error
	// Retain stores pk as the topic's retained message (or deletes it, for an
	// empty payload [MQTT-3.3.1-6]) without delivering it to anyone.
	Retain(pk packets.Packet) error
}

// Delivery is what one instance receives for one forwarded message.
type Delivery struct {
	Packet packets.Packet
	// Plain: deliver to the instance's non-shared subscribers. False when the
	// instance is the origin (it has delivered already) or has only shared
	// subscribers for the topic.
	Plain bool
	// Groups are the shared subscriptions ("$share/{group}/{filter}", as
	// subscribed) for which this instance delivers the message to one of its
	// members; other instances with members of the same group do not.
	Groups []string
}

// ErrUnknownInstance is returned for an instance that has not joined the bus.
var ErrUnknownInstance = errors.New("broker: instance has not joined the bus")

// LocalBus is the in-process Bus of an embedded fleet. Delivery is
// synchronous, on the publisher's goroutine, so the order of one publisher's
// messages is kept on every instance [MQTT-4.6.0-6] and nothing queues
// between instances: a delivery only places the message in each matching
// client's write queue, as a local publish does.
type LocalBus struct {
	members atomic.Pointer[map[string]Receiver] // copy on write; read on every publish

	mu     sync.Mutex                     // serialises Join, Leave and route changes
	owned  map[string]map[string]struct{} // instance → filters it routes, to clear on Leave
	routes *mqtt.TopicsIndex              // filter → instances; the "client" of a subscription is an instance

	// retainMu orders retained messages fleet-wide: each instance stores a
	// retained message locally before the bus sees it, so without one order
	// two concurrent retained publishes to a topic on two instances could
	// leave the instances with different retained messages.
	retainMu sync.Mutex
}

var _ Bus = (*LocalBus)(nil)

// NewLocalBus returns an empty in-process bus.
func NewLocalBus() *LocalBus {
	b := &LocalBus{
		owned:  make(map[string]map[string]struct{}),
		routes: mqtt.NewTopicsIndex(),
	}
	b.members.Store(&map[string]Receiver{})
	return b
}

// Join implements Bus.
func (b *LocalBus) Join(instance string, r Receiver) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.members.Load()
	if _, ok := old[instance]; ok {
		return fmt.Errorf("broker: instance %q has joined the bus already", instance)
	}
	next := make(map[string]Receiver, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[instance] = r
	b.members.Store(&next)
	b.owned[instance] = make(map[string]struct{})
	return nil
}

// Leave implements Bus.
func (b *LocalBus) Leave(instance string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.members.Load()
	if _, ok := old[instance]; !ok {
		return fmt.Errorf("leave %q: %w", instance, ErrUnknownInstance)
	}
	next := make(map[string]Receiver, len(old))
	for k, v := range old {
		if k != instance {
			next[k] = v
		}
	}
	b.members.Store(&next)
	for filter := range b.owned[instance] {
		b.routes.Unsubscribe(filter, instance)
	}
	delete(b.owned, instance)
	return nil
}

// AddRoute implements Bus.
func (b *LocalBus) AddRoute(instance, filter string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	owned, ok := b.owned[instance]
	if !ok {
		return fmt.Errorf("add route %q for %q: %w", filter, instance, ErrUnknownInstance)
	}
	owned[filter] = struct{}{}
	b.routes.Subscribe(instance, packets.Subscription{Filter: filter})
	return nil
}

// RemoveRoute implements Bus.
func (b *LocalBus) RemoveRoute(instance, filter string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	owned, ok := b.owned[instance]
	if !ok {
		return fmt.Errorf("remove route %q for %q: %w", filter, instance, ErrUnknownInstance)
	}
	delete(owned, filter)
	b.routes.Unsubscribe(filter, instance)
	return nil
}

// Routes returns the number of filters instance routes (for metrics).
func (b *LocalBus) Routes(instance string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.owned[instance])
}

// Publish implements Bus.
func (b *LocalBus) Publish(origin string, pk packets.Packet) error {
	members := *b.members.Load()
	if _, ok := members[origin]; !ok {
		return fmt.Errorf("publish from %q: %w", origin, ErrUnknownInstance)
	}

	plan := b.plan(origin, pk.TopicName, members)

	if pk.FixedHeader.Retain {
		// Every instance stores the message, in the order of this lock, the
		// origin again too (see retainMu); instances that get a Delivery
		// store it while delivering.
		b.retainMu.Lock()
		defer b.retainMu.Unlock()
	}

	var errs []error
	for instance, r := range members {
		d, ok := plan[instance]
		switch {
		case ok:
			d.Packet = pk
			if err := r.Deliver(*d); err != nil {
				errs = append(errs, fmt.Errorf("deliver to %s: %w", instance, err))
			}
		case pk.FixedHeader.Retain:
			if err := r.Retain(pk); err != nil {
				errs = append(errs, fmt.Errorf("retain on %s: %w", instance, err))
			}
		}
	}
	return errors.Join(errs...)
}

// plan decides which instances get the message for topic, and which of them
// serves each matching shared subscription group.
func (b *LocalBus) plan(origin, topic string, members map[string]Receiver) map[string]*Delivery {
	return planDelivery(b.routes, origin, topic, func(instance string) bool {
		_, ok := members[instance]
		return ok
	})
}

// planDelivery is the routing decision every Bus makes, over a route table
// in which the "client" of each subscription is an instance: the instances
// (members of the fleet, per member) that get a message for topic published
// on origin, and which of them serves each matching shared subscription
// group.
func planDelivery(routes *mqtt.TopicsIndex, origin, topic string, member func(string) bool) map[string]*Delivery {
	subs := routes.Subscribers(topic) // MQTT matching rules, $share and $-topics included [MQTT-4.7.2-1]
	var plan map[string]*Delivery
	get := func(instance string) *Delivery {
		if plan == nil {
			plan = make(map[string]*Delivery, len(subs.Subscriptions)+len(subs.Shared))
		}
		d, ok := plan[instance]
		if !ok {
			d = &Delivery{}
			plan[instance] = d
		}
		return d
	}

	for instance := range subs.Subscriptions {
		if instance != origin && member(instance) {
			get(instance).Plain = true
		}
	}

	// A shared subscription delivers each message to one member of the group
	// (MQTT 5.0 §4.8.2): the bus picks one of the instances that hold members,
	// uniformly, and that instance picks one of its members.
	var holders []string
	for group, byInstance := range subs.Shared {
		holders = holders[:0]
		for instance := range byInstance {
			if member(instance) {
				holders = append(holders, instance)
			}
		}
		if len(holders) == 0 {
			continue
		}
		d := get(holders[rand.IntN(len(holders))])
		d.Groups = append(d.Groups, group)
	}
	return plan
}
