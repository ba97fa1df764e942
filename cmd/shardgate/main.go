// Command shardgate is a layer-4, shard-aware load balancer for MQTT.
//
//	shardgate proxy --config proxy.yaml   run the proxy
//	shardgate broker --config broker.yaml run one instance of a broker shard
//	shardgate demo                        a demo fleet on 127.0.0.1:1883
//	shardgate route <client-id>           where a client ID goes (contract v1)
//	shardgate bench <scenario>            load and capacity benchmarks
//
// The command is thin: flags, config loading and signals. The work is done
// by the proxy, backend, mqttwire and broker packages.
package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
)

var commands = []struct {
	name, summary string
	run           func(args []string) error
}{
	{"proxy", "run the proxy (--config proxy.yaml)", runProxy},
	{"broker", "run one broker instance of a shard (--config broker.yaml)", runBroker},
	{"demo", "run a demo fleet: 3 embedded broker shards behind the proxy on 127.0.0.1:1883", runDemo},
	{"route", "print where a client ID is routed, as JSON (routing contract v1)", runRoute},
	{"bench", "benchmarks: idle (memory and fds per idle connection), propagation (consul maint to the last proxy)", runBench},
}

func main() {
	if len(os.Args) < 2 {
		usage(os.Stderr)
		os.Exit(2)
	}
	name := os.Args[1]
	if name == "-h" || name == "--help" || name == "help" {
		usage(os.Stdout)
		return
	}
	for _, c := range commands {
		if c.name == name {
			if err := c.run(os.Args[2:]); err != nil {
				fmt.Fprintf(os.Stderr, "shardgate %s: %v\n", name, err)
				os.Exit(1)
			}
			return
		}
	}
	fmt.Fprintf(os.Stderr, "shardgate: unknown command %q\n", name)
	usage(os.Stderr)
	os.Exit(2)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: shardgate <command> [flags]")
	fmt.Fprintln(w)
	for _, c := range commands {
		fmt.Fprintf(w, "  %-7s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'shardgate <command> -h' for the flags of a command.")
}

// newLogger builds the structured logger for level and format ("text" or
// "json"), writing to stderr.
func newLogger(level, format string) *slog.Logger {
	var l slog.Level
	switch strings.ToLower(level) {
	case "debug":
		l = slog.LevelDebug
	case "warn":
		l = slog.LevelWarn
	case "error":
		l = slog.LevelError
	default:
		l = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: l}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}
