package main

import (
	"log/slog"
	"os"
	"runtime"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shardgate/shardgate/internal/procs"
)

// startThreads applies the config's `threads` to this process: a fixed
// GOMAXPROCS, or a Governor (returned) that moves it with the load. The
// GOMAXPROCS environment variable, when set, is left to the runtime.
func startThreads(threads string, log *slog.Logger, reg prometheus.Registerer) *procs.Governor {
	if env := os.Getenv("GOMAXPROCS"); env != "" {
		log.Info("threads: GOMAXPROCS is set in the environment; `threads` is ignored", "GOMAXPROCS", env)
		return nil
	}
	var g *procs.Governor
	if n, err := strconv.Atoi(threads); err == nil {
		runtime.GOMAXPROCS(n)
	} else if max := runtime.GOMAXPROCS(0); max > 1 {
		g = procs.New(max)
	}
	if reg != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "shardgate_threads",
			Help: "Threads running Go code at once (GOMAXPROCS); with threads: auto it moves between 1 and the CPU count with the load.",
		}, func() float64 { return float64(runtime.GOMAXPROCS(0)) }))
		if g != nil {
			reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "shardgate_thread_raises_total",
				Help: "Moves of threads: auto from one thread to all, because the loops fell behind on one.",
			}, func() float64 { return float64(g.Raises.Load()) }))
		}
	}
	return g
}
