package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"github.com/shardgate/shardgate/broker"
	"github.com/shardgate/shardgate/proxy"
)

// runDemo starts a whole fleet in one process, with no external service:
// embedded broker shards (in memory, joined by an in-process cross-shard
// bus, so they behave like one broker) behind the proxy, which checks them
// with MQTT health probes like any static backend.
func runDemo(args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:1883", "device-facing address of the proxy")
	admin := fs.String("admin", proxy.DefaultAdmin, "admin HTTP address of the proxy")
	shards := fs.Int("shards", broker.DefaultShards, "broker shards")
	brokerBase := fs.Int("broker-port", 0, "first broker port on 127.0.0.1 (0: any free ports)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *shards < 1 {
		return fmt.Errorf("--shards: %d is below 1", *shards)
	}
	log := newLogger(*level, "text")
	addrs := make([]string, *shards)
	for i := range addrs {
		port := 0
		if *brokerBase > 0 {
			port = *brokerBase + i
		}
		addrs[i] = fmt.Sprintf("127.0.0.1:%d", port)
	}
	fleet, err := broker.StartEmbedded(context.Background(), broker.EmbeddedConfig{Shards: *shards, Addrs: addrs, Log: log.With("component", "broker")})
	if err != nil {
		return err
	}
	defer fleet.Close()

	var y strings.Builder
	fmt.Fprintf(&y, "listen: [%q]\nadmin: %q\nshards: %d\nhealth: {type: mqtt, interval: 1s, timeout: 500ms, rise: 1, fall: 2}\nbackends:\n  static:\n", *listen, *admin, *shards)
	for i, a := range fleet.Addrs() {
		fmt.Fprintf(&y, "    - {id: demo-shard-%d, address: %q, shard: %d}\n", i, a.String(), i)
	}
	cfg, err := proxy.ParseConfig([]byte(y.String()))
	if err != nil {
		return err
	}
	for i, a := range fleet.Addrs() {
		log.Info("demo broker", "shard", i, "address", a.String())
	}
	log.Info("demo fleet: connect devices to the proxy", "mqtt", *listen, "admin", "http://"+*admin+"/metrics", "route", "http://"+*admin+"/api/v1/route?client_id=device-1")
	return serveProxy(cfg, log, nil, nil, nil, fleet)
}
