package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/shardgate/shardgate/proxy"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildBin  string
	buildErr  error
)

// TestMain removes the binary that buildShardgate built.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// buildShardgate builds the binary once per test binary run, so every test
// of a run exercises the same build.
func buildShardgate(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "shardgate-test-bin-")
		if buildErr != nil {
			return
		}
		buildBin = filepath.Join(buildDir, "shardgate")
		out, err := exec.Command("go", "build", "-o", buildBin, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin
}

// TestRouteProcessesAgreeWithVectors checks contract v1 across separate
// processes: every known-answer vector, computed by its own `shardgate
// route` process, gives the committed shard.
func TestRouteProcessesAgreeWithVectors(t *testing.T) {
	raw, err := os.ReadFile("../../backend/testdata/contract-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	var vectors []struct {
		ClientID string         `json:"client_id"`
		Shards   map[string]int `json:"shards"`
	}
	if err := json.Unmarshal(raw, &vectors); err != nil {
		t.Fatal(err)
	}
	if len(vectors) < 40 {
		t.Fatalf("only %d vectors", len(vectors))
	}
	bin := buildShardgate(t)
	checked := 0
	for _, v := range vectors {
		if v.ClientID == "" {
			continue // an empty client ID routes by source address, not by ID
		}
		for n, want := range v.Shards {
			if testing.Short() && n != "7" && n != "1000" {
				continue
			}
			out, err := exec.Command(bin, "route", "--shards", n, "--", v.ClientID).Output()
			if err != nil {
				t.Fatalf("route %q --shards %s: %v", v.ClientID, n, err)
			}
			var a proxy.RouteAnswer
			if err := json.Unmarshal(out, &a); err != nil {
				t.Fatalf("route output %q: %v", out, err)
			}
			if a.Contract != "v1" || a.ClientID != v.ClientID || a.Shard != want {
				t.Errorf("route %q with %s shards = %+v, want shard %d", v.ClientID, n, a, want)
			}
			checked++
		}
	}
	t.Logf("%d (client ID, shard count) pairs checked in separate processes", checked)
}

// TestRouteWithConfig checks the full object: shard, instance and address
// from a config's static backends, all taken as healthy.
func TestRouteWithConfig(t *testing.T) {
	bin := buildShardgate(t)
	cfg := filepath.Join(t.TempDir(), "proxy.yaml")
	var y strings.Builder
	y.WriteString("shards: 4\nbackends:\n  static:\n")
	for i := 0; i < 4; i++ {
		y.WriteString("    - {id: b" + strconv.Itoa(i) + ", address: \"127.0.0.1:" + strconv.Itoa(20000+i) + "\", shard: " + strconv.Itoa(i) + "}\n")
	}
	if err := os.WriteFile(cfg, []byte(y.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := proxy.LoadConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := proxy.StaticSnapshot(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"device-1", "device-2", "sensor/ä", "x"} {
		out, err := exec.Command(bin, "route", "--config", cfg, id).Output()
		if err != nil {
			t.Fatal(err)
		}
		var got proxy.RouteAnswer
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatal(err)
		}
		want := proxy.Answer(snap, id)
		if got.Instance == nil || got.Address == nil || *got.Instance != "b"+strconv.Itoa(got.Shard) ||
			*got.Address != "127.0.0.1:"+strconv.Itoa(20000+got.Shard) || got.Shard != want.Shard {
			t.Errorf("route %q = %s, want shard %d on b%d", id, out, want.Shard, want.Shard)
		}
	}
}
