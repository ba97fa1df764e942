package main

import (
	"runtime"
	"testing"
	"time"
)

// TestE2EThreads: `threads: auto` runs an idle proxy on one thread, and a
// number fixes GOMAXPROCS, as the shardgate_threads gauge reports.
func TestE2EThreads(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("one CPU: auto has nothing to move")
	}
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 1)
	for _, tc := range []struct {
		line string
		want float64
	}{{"", 1}, {"threads: auto\n", 1}, {"threads: 3\n", 3}} {
		cfg := e2eFleetOf(t, ms)
		px := &e2eProxy{mqtt: cfg.listen, admin: cfg.admin, cfgPath: t.TempDir() + "/proxy.yaml"}
		px.writeConfig(t, tc.line+cfg.yaml())
		px.e2eProcess = e2eStart(t, "shardgate proxy", bin, "proxy", "--config", px.cfgPath)
		px.waitAdmin(t)
		e2eWaitFor(t, "shardgate_threads", 5*time.Second, func() (bool, string) {
			m := px.metrics(t)
			return m["shardgate_threads"] == tc.want, px.out.String()
		})
		_, governed := px.metrics(t)["shardgate_thread_raises_total"]
		if governed != (tc.want == 1) {
			t.Errorf("%q: shardgate_thread_raises_total present: %v", tc.line, governed)
		}
		px.kill()
	}
}
