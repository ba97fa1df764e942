package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/shardgate/shardgate/proxy"
)

// benchPropagation measures how fast a `consul maint` reaches the proxies:
// it starts a real Consul agent (-dev), two Mosquitto instances of shard 0
// registered in it (priority 0 and 1, as brokers register), and N proxies
// watching it. Each repetition runs the real `consul maint -enable` on the
// primary and times, from just before the command starts, until the LAST
// proxy's /api/v1/route sends a test client ID elsewhere; then
// `consul maint -disable` and the time until every proxy routes it back.
func benchPropagation(args []string) error {
	fs := flag.NewFlagSet("bench propagation", flag.ContinueOnError)
	proxies := fs.Int("proxies", 2, "proxy processes watching the agent")
	reps := fs.Int("reps", 20, "maint -enable repetitions (each followed by a -disable)")
	poll := fs.Duration("poll", 5*time.Millisecond, "interval of each proxy's /api/v1/route poll")
	pause := fs.Duration("pause", 300*time.Millisecond, "idle time between a change's propagation and the next change")
	within := fs.Duration("timeout", 10*time.Second, "give up on a change not seen by every proxy within this")
	consulFlag := fs.String("consul", "", "consul binary (default: $SHARDGATE_CONSUL, else bin/consul of the shardgate checkout)")
	mosquitto := fs.String("mosquitto", "", "mosquitto binary (default: from PATH or /usr/sbin)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *proxies < 1 || *reps < 1 {
		return errors.New("bench propagation: --proxies and --reps must be at least 1")
	}
	consulBin, err := findConsul(*consulFlag)
	if err != nil {
		return err
	}
	mq, err := findMosquitto(*mosquitto)
	if err != nil {
		return err
	}
	procs, err := newBenchProcs("shardgate-bench-")
	if err != nil {
		return err
	}
	defer procs.stopAll(nil)
	ctx := procs.ctx

	agent, stopAgent, err := startBenchConsul(ctx, consulBin)
	if err != nil {
		return err
	}
	// The proxies and brokers go first (stopAll), so the agent's exit is
	// not logged by proxies still watching it.
	defer func() { procs.stopAll(nil); stopAgent() }()
	cc := consulapi.DefaultConfig()
	cc.Address = agent
	client, err := consulapi.NewClient(cc)
	if err != nil {
		return err
	}

	// Two Mosquitto instances of shard 0, registered as shardgate brokers
	// register (meta shard/shards/priority) with a TCP check.
	ids := []string{"bench-s0-a", "bench-s0-b"}
	addrs := make([]string, len(ids))
	for i, id := range ids {
		_, addr, err := procs.startMosquitto(mq, i)
		if err != nil {
			return err
		}
		addrs[i] = addr.String()
		port := int(addr.Port())
		err = client.Agent().ServiceRegister(&consulapi.AgentServiceRegistration{
			ID: id, Name: "mqtt-broker", Address: "127.0.0.1", Port: port,
			Meta: map[string]string{"shard": "0", "shards": "1", "priority": strconv.Itoa(i)},
			Check: &consulapi.AgentServiceCheck{
				CheckID: "service:" + id, TCP: addrs[i], Interval: "2s", Timeout: "1s",
				Status: consulapi.HealthPassing,
			},
		})
		if err != nil {
			return fmt.Errorf("register %s: %w", id, err)
		}
	}

	self, err := os.Executable()
	if err != nil {
		return err
	}
	admins := make([]string, *proxies)
	for i := range admins {
		admins[i] = "127.0.0.1:" + strconv.Itoa(freePort())
		cfg := fmt.Sprintf("listen: [\"127.0.0.1:%d\"]\nadmin: %q\nshards: 1\nevent_loops: 1\nlog: {level: warn}\n"+
			"backends:\n  consul: {address: %q, service: mqtt-broker}\n", freePort(), admins[i], agent)
		path := filepath.Join(procs.dir, fmt.Sprintf("proxy-%d.yaml", i))
		if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
			return err
		}
		if _, err := procs.start(os.Stderr, self, "proxy", "--config", path); err != nil {
			return err
		}
		if err := waitReady(admins[i], 10*time.Second); err != nil {
			return fmt.Errorf("proxy %d: %w", i, err)
		}
	}

	const clientID = "bench-propagation"
	primary := addrs[0]
	routesTo := func(want bool) func(addr string) bool {
		return func(addr string) bool { return (addr == primary) == want }
	}
	// Every proxy first routes the device to the primary.
	if _, err := benchAllRoute(admins, clientID, *poll, 10*time.Second, routesTo(true)); err != nil {
		return fmt.Errorf("before the first change: %w", err)
	}

	fmt.Printf("shardgate bench propagation: consul %s (-dev), %d proxies, 2 Mosquitto of shard 0, %d repetitions, poll %s\n\n",
		consulBin, *proxies, *reps, *poll)
	var away, afterCLI, back, cli []time.Duration
	for r := 0; r < *reps; r++ {
		time.Sleep(*pause)
		start, done, seen, err := benchChange(consulBin, agent, admins, clientID, *poll, *within, routesTo(false), "-enable", "-reason=bench")
		if err != nil {
			return fmt.Errorf("repetition %d: %w", r, err)
		}
		away = append(away, seen.Sub(start))
		cli = append(cli, done.Sub(start))
		afterCLI = append(afterCLI, seen.Sub(done))

		time.Sleep(*pause)
		start, _, seen, err = benchChange(consulBin, agent, admins, clientID, *poll, *within, routesTo(true), "-disable")
		if err != nil {
			return fmt.Errorf("repetition %d: %w", r, err)
		}
		back = append(back, seen.Sub(start))
	}
	fmt.Printf("%-42s %8s %8s %8s %8s\n", "", "min", "median", "p90", "max")
	for _, row := range []struct {
		name string
		ds   []time.Duration
	}{
		{"maint -enable: last proxy routes away", away},
		{"  the consul maint command alone", cli},
		{"  last proxy minus the command's exit", afterCLI},
		{"maint -disable: last proxy routes back", back},
	} {
		q := benchQuantiles(row.ds)
		fmt.Printf("%-42s %8s %8s %8s %8s\n", row.name, benchMS(q[0]), benchMS(q[1]), benchMS(q[2]), benchMS(q[3]))
	}
	return nil
}

// benchChange runs `consul maint <args> -service=bench-s0-a` while every
// proxy is already being polled (a proxy may see the change before the
// command exits), and returns when the command started, when it exited, and
// when the last proxy's route first satisfied ok. Without pollers running
// during the command the figure would be rounded up to the command's exit.
func benchChange(consulBin, agent string, admins []string, clientID string, poll, within time.Duration, ok func(string) bool, args ...string) (start, done, seen time.Time, err error) {
	type result struct {
		seen time.Time
		err  error
	}
	res := make(chan result, 1)
	start = time.Now()
	go func() {
		s, err := benchAllRoute(admins, clientID, poll, within, ok)
		res <- result{s, err}
	}()
	args = append([]string{"maint"}, args...)
	args = append(args, "-service=bench-s0-a", "-http-addr="+agent)
	out, cerr := exec.Command(consulBin, args...).CombinedOutput()
	done = time.Now()
	r := <-res
	if cerr != nil {
		return start, done, seen, fmt.Errorf("consul %s: %w: %s", strings.Join(args, " "), cerr, out)
	}
	if r.err != nil {
		return start, done, seen, fmt.Errorf("consul %s: %w", strings.Join(args, " "), r.err)
	}
	return start, done, r.seen, nil
}

// benchAllRoute polls /api/v1/route of every proxy, each every poll, until
// each has answered an address ok accepts, and returns when the last one
// first did.
func benchAllRoute(admins []string, clientID string, poll, within time.Duration, ok func(addr string) bool) (time.Time, error) {
	deadline := time.Now().Add(within)
	seen := make([]time.Time, len(admins))
	errs := make([]error, len(admins))
	var wg sync.WaitGroup
	for i, admin := range admins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			seen[i], errs[i] = benchPollRoute(admin, clientID, poll, deadline, ok)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return time.Time{}, err
	}
	return slices.MaxFunc(seen, func(a, b time.Time) int { return a.Compare(b) }), nil
}

var benchHTTP = &http.Client{Timeout: 2 * time.Second}

// benchPollRoute is one proxy's poll loop of benchAllRoute.
func benchPollRoute(admin, clientID string, poll time.Duration, deadline time.Time, ok func(addr string) bool) (time.Time, error) {
	u := "http://" + admin + "/api/v1/route?client_id=" + url.QueryEscape(clientID)
	last := "no answer"
	for {
		resp, err := benchHTTP.Get(u)
		now := time.Now()
		if err == nil {
			var a proxy.RouteAnswer
			err = json.NewDecoder(resp.Body).Decode(&a)
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err == nil {
				addr := ""
				if a.Address != nil {
					addr = *a.Address
				}
				if ok(addr) {
					return now, nil
				}
				last = "routes to " + strconv.Quote(addr)
			}
		}
		if err != nil {
			last = err.Error()
		}
		if now.After(deadline) {
			return time.Time{}, fmt.Errorf("proxy %s: no change in time; last: %s", admin, last)
		}
		time.Sleep(poll)
	}
}

// benchQuantiles returns min, median, p90 and max (nearest rank).
func benchQuantiles(ds []time.Duration) [4]time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := func(p float64) time.Duration {
		i := int(p*float64(len(s))+0.999999) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	return [4]time.Duration{s[0], rank(0.5), rank(0.9), s[len(s)-1]}
}

func benchMS(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64) + "ms"
}

// findConsul finds the consul binary as internal/consultest does (the bench
// must not import testing): flag, $SHARDGATE_CONSUL, else bin/consul at the
// root of the shardgate module above the working directory or above this
// executable.
func findConsul(flagPath string) (string, error) {
	if flagPath != "" {
		return flagPath, nil
	}
	if p := os.Getenv("SHARDGATE_CONSUL"); p != "" {
		return p, nil
	}
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	for _, dir := range starts {
		for {
			if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
				p := filepath.Join(dir, "bin", "consul")
				if _, err := os.Stat(p); err == nil {
					return p, nil
				}
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", errors.New("no consul binary: run make consul, or pass --consul or set SHARDGATE_CONSUL")
}

// startBenchConsul runs a -dev Consul agent on loopback ports, waits until
// it has a leader, and returns its HTTP address and a stop function.
func startBenchConsul(ctx context.Context, bin string) (string, func(), error) {
	// Serf needs its ports free for UDP as well; freePort checks TCP only,
	// so retry the whole start on a clash.
	var last error
	for attempt := 0; attempt < 3; attempt++ {
		httpPort := freePort()
		addr := "127.0.0.1:" + strconv.Itoa(httpPort)
		cmd := exec.CommandContext(ctx, bin, "agent", "-dev", "-node=shardgate-bench",
			"-bind=127.0.0.1", "-advertise=127.0.0.1", "-client=127.0.0.1",
			"-http-port="+strconv.Itoa(httpPort),
			"-serf-lan-port="+strconv.Itoa(freePort()),
			"-serf-wan-port="+strconv.Itoa(freePort()),
			"-server-port="+strconv.Itoa(freePort()),
			"-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
			"-hcl=disable_update_check = true", "-hcl=disable_anonymous_signature = true",
			"-log-level=warn")
		cmd.Env = append(os.Environ(), "CHECKPOINT_DISABLE=1")
		var out strings.Builder
		w := &benchSyncWriter{w: &out}
		cmd.Stdout, cmd.Stderr = w, w
		if err := cmd.Start(); err != nil {
			return "", nil, fmt.Errorf("start consul: %w", err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		stop := func() {
			_ = cmd.Process.Kill()
			<-done
		}
		if last = benchWaitLeader(addr, done, 30*time.Second); last == nil {
			return addr, stop, nil
		}
		stop()
		last = fmt.Errorf("consul agent: %w\n%s", last, out.String())
	}
	return "", nil, last
}

type benchSyncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *benchSyncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// benchWaitLeader polls the agent until it reports a raft leader.
func benchWaitLeader(addr string, exited <-chan struct{}, within time.Duration) error {
	deadline := time.Now().Add(within)
	last := errors.New("no answer")
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("exited: %w", last)
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			resp, err := benchHTTP.Get("http://" + addr + "/v1/status/leader")
			if err == nil {
				var leader string
				err = json.NewDecoder(resp.Body).Decode(&leader)
				resp.Body.Close()
				if err == nil && leader != "" {
					return nil
				}
				if err == nil {
					err = errors.New("no leader yet")
				}
			}
			last = err
		} else {
			last = err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("not ready after %s: %w", within, last)
}
