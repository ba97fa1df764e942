package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/proxy"
)

// runRoute prints the routing contract's answer for one client ID. With
// --admin it asks a running proxy (which knows the instances' health); with
// --config it computes offline from the static backends, all taken as
// healthy; with only --shards it computes the shard alone.
func runRoute(args []string) error {
	fs := flag.NewFlagSet("route", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "proxy config: route over its static backends, all taken as healthy")
	shards := fs.Int("shards", 0, "shard count: compute the shard only (no instance)")
	admin := fs.String("admin", "", "ask the running proxy whose admin address this is (e.g. 127.0.0.1:9883)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: shardgate route [--config proxy.yaml | --shards N | --admin IP:port] <client-id>")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("exactly one client ID expected")
	}
	id := fs.Arg(0)
	var ans proxy.RouteAnswer
	switch {
	case *admin != "":
		a, err := askAdmin(*admin, id)
		if err != nil {
			return err
		}
		ans = a
	case *cfgPath != "":
		cfg, err := proxy.LoadConfig(*cfgPath)
		if err != nil {
			return err
		}
		snap, err := proxy.StaticSnapshot(cfg)
		if err != nil {
			return err
		}
		ans = proxy.Answer(snap, id)
	case *shards > 0:
		ans = proxy.RouteAnswer{Contract: backend.ContractVersion, ClientID: id, Shard: backend.ShardOf([]byte(id), *shards)}
	default:
		fs.Usage()
		return errors.New("one of --config, --shards or --admin is required")
	}
	enc := json.NewEncoder(os.Stdout)
	return enc.Encode(ans)
}

func askAdmin(addr, id string) (proxy.RouteAnswer, error) {
	var a proxy.RouteAnswer
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/api/v1/route?client_id=" + url.QueryEscape(id))
	if err != nil {
		return a, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return a, fmt.Errorf("%s: %s", resp.Status, b)
	}
	return a, json.NewDecoder(resp.Body).Decode(&a)
}
