package broker

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestAdminReadyz pins /readyz's contract with Consul and the proxies:
// 503 starting, 200 serving, 429 (a warning: still passing) while Redis
// fails, 503 stopping.
func TestAdminReadyz(t *testing.T) {
	var fault error
	a, err := NewAdmin(AdminOptions{Addr: "127.0.0.1:0", Degraded: func() error { return fault }})
	if err != nil {
		t.Fatal(err)
	}
	go a.Serve()
	t.Cleanup(func() { _ = a.Shutdown(context.Background()) })
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + a.Addr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	check := func(wantCode int, wantBody string) {
		t.Helper()
		code, body := get("/readyz")
		if code != wantCode || !strings.HasPrefix(body, wantBody) {
			t.Errorf("/readyz = %d %q, want %d %q", code, body, wantCode, wantBody)
		}
	}
	check(503, "starting")
	a.SetPhase(PhaseServing)
	check(200, "ok")
	fault = errors.New("redis: connection refused")
	check(429, "warning: redis: connection refused")
	a.SetPhase(PhaseStopping)
	check(503, "stopping")
	if code, body := get("/healthz"); code != 200 || body != "ok" {
		t.Errorf("/healthz = %d %q", code, body)
	}
	if code, _ := get("/metrics"); code != 200 {
		t.Errorf("/metrics = %d", code)
	}
}
