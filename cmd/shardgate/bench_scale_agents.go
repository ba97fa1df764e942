package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shardgate/shardgate/internal/loadgen"
)

// scaleFleet is a fleet of agents running in the background: the scale
// bench ends a hold itself (SIGINT: the agents close their devices and
// report) or cuts it (SIGKILL: the kernel closes every socket at once, as a
// network outage would, and no report comes back).
type scaleFleet struct {
	jobs    []loadgen.Job
	done    chan struct{}
	reports []loadgen.Report
	err     error
}

// scaleJobs splits devices into one job per agent: contiguous index ranges,
// the in-flight bound shared out, one start time.
func scaleJobs(kind, target, prefix string, devices, agents int, locals []string, keepAlive, inFlight int, retry bool, d time.Duration) []loadgen.Job {
	if agents <= 0 {
		agents = (devices + devicesPerAgent - 1) / devicesPerAgent
	}
	agents = max(1, min(agents, devices))
	start := time.Now().Add(500*time.Millisecond + time.Duration(agents)*50*time.Millisecond)
	jobs := make([]loadgen.Job, agents)
	first := 0
	for i := range jobs {
		n := devices / agents
		if i < devices%agents {
			n++
		}
		jobs[i] = loadgen.Job{
			Kind: kind, Target: target, Prefix: prefix, First: first, Count: n,
			Locals: locals, KeepAlive: uint16(keepAlive), InFlight: max(1, inFlight/agents),
			Retry: retry, Duration: loadgen.Duration(d), StartAt: start,
		}
		first += n
	}
	return jobs
}

func startFleet(ctx context.Context, jobs []loadgen.Job) (*scaleFleet, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	f := &scaleFleet{jobs: jobs, done: make(chan struct{})}
	go func() {
		defer close(f.done)
		f.reports, f.err = loadgen.RunAgents(ctx, self, jobs)
	}()
	return f, nil
}

func (f *scaleFleet) start() time.Time { return f.jobs[0].StartAt }

// exited says whether every agent has ended.
func (f *scaleFleet) exited() bool {
	select {
	case <-f.done:
		return true
	default:
		return false
	}
}

// signal sends sig to every agent of this process, which it finds by
// parent pid and command line (RunAgents does not expose its children).
func (f *scaleFleet) signal(sig syscall.Signal) int {
	n := 0
	for _, pid := range agentPids() {
		if syscall.Kill(pid, sig) == nil {
			n++
		}
	}
	return n
}

// finish ends a hold cleanly (SIGINT) and returns the merged report.
func (f *scaleFleet) finish(within time.Duration) (loadgen.Report, error) {
	f.signal(syscall.SIGINT)
	select {
	case <-f.done:
	case <-time.After(within):
		f.signal(syscall.SIGKILL)
		<-f.done
		return loadgen.Report{}, fmt.Errorf("agents did not report within %s of SIGINT", within)
	}
	return loadgen.Merge(f.reports), f.err
}

// cut kills every agent at once; the devices' sockets close with them.
func (f *scaleFleet) cut() {
	f.signal(syscall.SIGKILL)
	<-f.done
}

// agentPids are this process's children running `bench agent`.
func agentPids() []int {
	me := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		i := strings.LastIndexByte(string(raw), ')')
		f := strings.Fields(string(raw[i+1:]))
		if len(f) < 2 || f[1] != strconv.Itoa(me) {
			continue
		}
		cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if strings.Contains(string(cmd), "\x00bench\x00agent") {
			out = append(out, pid)
		}
	}
	return out
}

// waitFleetConnected waits until the proxy holds want devices and has
// handed want more to brokers than when the wait began (a count of held
// connections alone includes handshakes still refused or in flight), then
// gives the last CONNACKs a moment. It gives up when the agents have all
// exited (nothing more will connect) or within passes.
func waitFleetConnected(e *scaleEnv, f *scaleFleet, want int, within time.Duration) (int, error) {
	const okSeries = `shardgate_connects_total{result="ok"}`
	ok0, err := e.scaleMetric(okSeries)
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(within)
	for {
		st, err := e.status()
		if err == nil && st.Connections >= want {
			if ok, merr := e.scaleMetric(okSeries); merr == nil && ok-ok0 >= float64(want) {
				time.Sleep(time.Second)
				return st.Connections, nil
			}
		}
		if f.exited() {
			return st.Connections, fmt.Errorf("agents exited with the proxy holding %d of %d devices: %v", st.Connections, want, f.err)
		}
		if time.Now().After(deadline) {
			return st.Connections, fmt.Errorf("proxy holds %d of %d devices after %s (%v)", st.Connections, want, within, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
