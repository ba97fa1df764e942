package servertest

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"
)

// RedisOptions configures Redis. The zero value is a server on a free port
// that keeps nothing on disk.
type RedisOptions struct {
	// Port is the server's port on 127.0.0.1. Default: a free port.
	Port uint16

	// Args are more redis-server arguments, after the defaults: e.g.
	// "--maxmemory", "1mb". Default: none.
	Args []string

	// StartTimeout bounds the wait for an answer to PING. Default 10s.
	StartTimeout time.Duration
}

// RedisServer is a running redis-server. It is killed when the test ends.
// Connect with the client the test uses: this package has none, so that it
// needs nothing beyond the standard library.
type RedisServer struct {
	*server
}

// Redis starts a redis-server on 127.0.0.1 and waits until it answers PING.
// It saves no snapshots and keeps no append-only file, so a restarted
// server comes back empty. It fails the test (or skips it under -short) when
// redis-server is not installed.
func Redis(t testing.TB, opts RedisOptions) *RedisServer {
	t.Helper()
	dir := t.TempDir()
	return &RedisServer{startServer(t, &server{
		name:    "redis-server",
		timeout: opts.StartTimeout,
		ready:   pingReady,
		args: func(addr netip.AddrPort) []string {
			args := []string{"--save", "", "--appendonly", "no",
				"--bind", addr.Addr().String(), "--port", strconv.Itoa(int(addr.Port())),
				"--dir", dir}
			return append(args, opts.Args...)
		},
	}, "redis-server", opts.Port)}
}

// pingReady says whether the Redis server on addr answers PING with PONG;
// until it has loaded its data set it answers -LOADING.
func pingReady(addr netip.AddrPort) error {
	c, err := net.DialTimeout("tcp", addr.String(), time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING: %q", line)
	}
	return nil
}
