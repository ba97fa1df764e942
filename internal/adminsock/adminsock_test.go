package adminsock

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

// peerEnv, set in a child test process, makes TestMain fetch the status
// of that pid's admin socket and print what it got as JSON, instead of
// running the tests. The parent runs the child under another uid.
const peerEnv = "SHARDGATE_ADMINSOCK_TEST_PEER_PID"

// peerReport is what a child prints.
type peerReport struct {
	UID    int    `json:"uid"`
	Status Status `json:"status"`
	Err    string `json:"err"`
}

func TestMain(m *testing.M) {
	if v := os.Getenv(peerEnv); v != "" {
		os.Exit(runPeer(v))
	}
	os.Exit(m.Run())
}

func runPeer(pidText string) int {
	pid, err := strconv.Atoi(pidText)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := peerReport{UID: os.Getuid()}
	r.Status, err = FetchStatus(ctx, pid)
	if err != nil {
		r.Err = err.Error()
	}
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		return 2
	}
	return 0
}

// fakePID is a pid no process has (Linux pids stay below 1<<22), distinct
// per test binary so parallel package runs do not collide.
func fakePID() int { return 1<<22 + os.Getpid() }

// admin is a small real admin server: a registry on /metrics and a status
// on /api/v1/status, served on ListenPID.
type admin struct {
	pid      int
	ln       *Listener
	reg      *prometheus.Registry
	statuses atomic.Int64 // /api/v1/status requests served
	kept     atomic.Int64 // requests that asked to keep their connection open
}

func serveAdmin(t *testing.T, pid int) *admin {
	t.Helper()
	ln, err := ListenPID(pid)
	if err != nil {
		t.Fatal(err)
	}
	a := &admin{pid: pid, ln: ln.(*Listener), reg: prometheus.NewRegistry()}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /api/v1/status", func(w http.ResponseWriter, r *http.Request) {
		a.statuses.Add(1)
		if !r.Close {
			a.kept.Add(1)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(Status{PID: pid, Role: "worker", Generation: 7, Worker: 2, Connections: 1234, HandedOver: true})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return a
}

func TestName(t *testing.T) {
	if got := Name(4242); got != "shardgate-admin-4242" {
		t.Fatalf("Name(4242) = %q", got)
	}
	ln, err := ListenPID(fakePID())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if got, want := ln.Addr().String(), "@"+Name(fakePID()); got != want {
		t.Fatalf("listening on %q, want %q", got, want)
	}
}

func TestStatusRoundTrip(t *testing.T) {
	a := serveAdmin(t, fakePID())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := FetchStatus(ctx, a.pid)
	if err != nil {
		t.Fatal(err)
	}
	want := Status{PID: a.pid, Role: "worker", Generation: 7, Worker: 2, Connections: 1234, HandedOver: true}
	if got != want {
		t.Fatalf("FetchStatus = %+v, want %+v", got, want)
	}
}

func TestClientIgnoresURLHost(t *testing.T) {
	a := serveAdmin(t, fakePID())
	c := Client(a.pid, 5*time.Second)
	defer c.CloseIdleConnections()
	for _, u := range []string{URL + "/api/v1/status", "http://127.0.0.1:1/api/v1/status", "http://nowhere.invalid/api/v1/status"} {
		resp, err := c.Get(u)
		if err != nil {
			t.Fatalf("GET %s: %v", u, err)
		}
		var st Status
		err = json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if err != nil || st.PID != a.pid {
			t.Fatalf("GET %s: status %+v, err %v", u, st, err)
		}
	}
	if n := a.statuses.Load(); n != 3 {
		t.Fatalf("server saw %d status requests, want 3", n)
	}
	// A Client per request must leave no idle connection behind.
	if n := a.kept.Load(); n != 0 {
		t.Fatalf("%d requests kept their connection open", n)
	}
}

// TestGatherRoundTrip checks that what Gather parses is what the registry
// exposes: encoding both as text must give the same bytes.
func TestGatherRoundTrip(t *testing.T) {
	a := serveAdmin(t, fakePID())
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "shardgate_test_accepted_total", Help: "Accepted."})
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shardgate_test_held", Help: "Held."}, []string{"shard", "listener"})
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shardgate_test_handoff_seconds", Help: "Handoff.", Buckets: []float64{0.001, 0.01, 0.1}})
	s := prometheus.NewSummary(prometheus.SummaryOpts{Name: "shardgate_test_peek_bytes", Help: "Peek."})
	a.reg.MustRegister(c, g, h, s)
	c.Add(17)
	g.WithLabelValues("3", "[::]:1883").Set(40)
	g.WithLabelValues("0", "0.0.0.0:1883").Set(-2.5)
	for _, v := range []float64{0.0005, 0.004, 0.05, 2} {
		h.Observe(v)
	}
	s.Observe(300)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := Gather(ctx, a.pid)
	if err != nil {
		t.Fatal(err)
	}
	want, err := a.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("Gather got %d families, want %d", len(got), len(want))
	}
	if g, w := text(t, got), text(t, want); g != w {
		t.Fatalf("Gather round trip differs:\n got:\n%s\nwant:\n%s", g, w)
	}
	for i := 1; i < len(got); i++ {
		if got[i-1].GetName() >= got[i].GetName() {
			t.Fatalf("families not sorted by name: %q before %q", got[i-1].GetName(), got[i].GetName())
		}
	}
}

func text(t *testing.T, fams []*dto.MetricFamily) string {
	t.Helper()
	var b bytes.Buffer
	for _, mf := range fams {
		if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

func TestNotListening(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := FetchStatus(ctx, fakePID())
	if !errors.Is(err, ErrNotListening) {
		t.Fatalf("FetchStatus with nobody listening: %v, want ErrNotListening", err)
	}
	if _, err := Gather(ctx, fakePID()); !errors.Is(err, ErrNotListening) {
		t.Fatalf("Gather with nobody listening: %v, want ErrNotListening", err)
	}
}

// TestNameTaken: two processes can never share a pid's name, so a second
// listener on it fails instead of silently splitting the traffic.
func TestNameTaken(t *testing.T) {
	ln, err := ListenPID(fakePID())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ln2, err := ListenPID(fakePID()); err == nil {
		ln2.Close()
		t.Fatal("second ListenPID on the same pid succeeded")
	} else if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second ListenPID: %v, want EADDRINUSE", err)
	}
}

func TestErrorStatus(t *testing.T) {
	ln, err := ListenPID(fakePID())
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "collecting metrics failed", http.StatusInternalServerError)
	})}
	go srv.Serve(ln)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = Gather(ctx, fakePID())
	if err == nil || !strings.Contains(err.Error(), "500") || !strings.Contains(err.Error(), "collecting metrics failed") {
		t.Fatalf("Gather from a failing admin: %v, want the status and body", err)
	}
}

// TestRefusesOtherUID runs this test binary as another uid (nobody) and as
// root against the admin socket: nobody's connection must be closed before
// the server sees a request, and root's, made after it, served.
func TestRefusesOtherUID(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("SHARDGATE_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal("needs root to run a peer under another uid, and SHARDGATE_REQUIRE_PRIVILEGED=1")
		}
		t.Skip("needs root to run a peer under another uid")
	}
	a := serveAdmin(t, fakePID())
	bin := nobodyCanRun(t)

	nobody := runPeerAs(t, bin, a.pid, &syscall.Credential{Uid: 65534, Gid: 65534})
	if nobody.UID != 65534 {
		t.Fatalf("peer ran as uid %d, want 65534", nobody.UID)
	}
	if nobody.Err == "" {
		t.Fatalf("peer with uid 65534 got status %+v, want refused", nobody.Status)
	}
	if n := a.ln.Refused(); n != 1 {
		t.Fatalf("listener refused %d connections, want 1 (peer error: %s)", n, nobody.Err)
	}
	if n := a.statuses.Load(); n != 0 {
		t.Fatalf("server handled %d status requests from the refused peer", n)
	}

	root := runPeerAs(t, bin, a.pid, nil)
	if root.Err != "" || root.Status.PID != a.pid {
		t.Fatalf("root peer after a refused one: status %+v, err %s", root.Status, root.Err)
	}
	if n := a.statuses.Load(); n != 1 {
		t.Fatalf("server handled %d status requests, want 1", n)
	}
	if n := a.ln.Refused(); n != 1 {
		t.Fatalf("listener refused %d connections after root's, want still 1", n)
	}
}

// nobodyCanRun copies the test binary where uid 65534 can execute it: go
// test builds it in a directory only its owner may enter.
func nobodyCanRun(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "adminsock-peer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	bin := filepath.Join(dir, "peer")
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return bin
}

func runPeerAs(t *testing.T, bin string, pid int, cred *syscall.Credential) peerReport {
	t.Helper()
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Dir = filepath.Dir(bin)
	cmd.Env = []string{peerEnv + "=" + strconv.Itoa(pid), "PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("peer: %v\n%s", err, stderr.String())
	}
	var r peerReport
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("peer output %q: %v", out, err)
	}
	return r
}

// TestAcceptErrorsPassThrough: a closed listener ends Accept with
// net.ErrClosed rather than looping.
func TestAcceptErrorsPassThrough(t *testing.T) {
	ln, err := ListenPID(fakePID())
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on a closed listener: %v, want net.ErrClosed", err)
	}
}
