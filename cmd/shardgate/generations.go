package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shardgate/shardgate/internal/adminsock"
)

// takeOverFrom tells the generations this process took over from (prev) to
// stop accepting, and systemd (NOTIFY_SOCKET, NotifyAccess=all) that this
// is the service's main process now. Without --upgrade it only warns that
// another generation still runs.
func takeOverFrom(up *upgrader, gen uint32, prev []int, log *slog.Logger) {
	if !up.takeover {
		if len(prev) > 0 {
			log.Warn("another proxy of this configuration is running: this one takes every new connection; it keeps its connected devices (use --upgrade to stop it)", "generation", gen, "pids", prev)
		}
		return
	}
	if gen == 0 {
		log.Error("upgrade: no eBPF steering, so the running proxy cannot be found or stopped; both now share new connections by the kernel's hash")
		return
	}
	for _, pid := range prev {
		if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
			log.Warn("upgrade: could not tell the previous generation to stop", "pid", pid, "err", err)
			continue
		}
		log.Info("upgrade: took every new connection; told the previous generation to stop accepting", "generation", gen, "previous_pid", pid)
	}
	if len(prev) == 0 {
		log.Info("upgrade: no previous generation running; serving", "generation", gen)
	}
	sdNotify(fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid()), log)
}

// prevGenCollector reports the devices the older generations this process
// took over from still hold, read from their private admin sockets: after
// a handover the admin port is the new generation's alone, and a scrape of
// it still sees every device on the host.
type prevGenCollector struct {
	pids func() []int
}

var (
	descPrevConns = prometheus.NewDesc("shardgate_previous_generation_connections",
		"Devices still held by older proxy generations that handed over to this one and are finishing them.", nil, nil)
	descPrevProcs = prometheus.NewDesc("shardgate_previous_generation_processes",
		"Older proxy generations still running after handing over to this one.", nil, nil)
)

func (c *prevGenCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descPrevConns
	ch <- descPrevProcs
}

func (c *prevGenCollector) Collect(ch chan<- prometheus.Metric) {
	conns, procs := previousGenerations(c.pids())
	ch <- prometheus.MustNewConstMetric(descPrevConns, prometheus.GaugeValue, float64(conns))
	ch <- prometheus.MustNewConstMetric(descPrevProcs, prometheus.GaugeValue, float64(procs))
}

// previousGenerations sums the devices of the processes pids that still
// answer on their admin socket.
func previousGenerations(pids []int) (conns, procs int) {
	for _, st := range fetchStatuses(pids) {
		conns += st.Connections
		procs++
	}
	return conns, procs
}

// fetchStatuses asks each process's private admin socket for its status,
// concurrently; a process that does not answer (exited) is left out.
func fetchStatuses(pids []int) map[int]adminsock.Status {
	out := make(map[int]adminsock.Status, len(pids))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, pid := range pids {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			st, err := adminsock.FetchStatus(ctx, pid)
			if err != nil {
				return
			}
			mu.Lock()
			out[pid] = st
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}
