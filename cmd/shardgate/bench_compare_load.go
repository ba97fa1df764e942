package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shardgate/shardgate/mqttwire"
)

// The workloads of `bench compare`: a minimal MQTT 3.1.1 client (CONNECT,
// SUBSCRIBE and PUBLISH at QoS 0) that every target is driven through the
// same way, so differences come from the target.

// cmpConn is one device: the socket and a reader for what the target sends.
type cmpConn struct {
	net.Conn
	r *bufio.Reader
}

const cmpIOTimeout = 10 * time.Second

// cmpConnect dials addr and completes CONNECT→CONNACK for id (clean
// session, keepalive 0: an idle device never needs to ping).
func cmpConnect(addr, id string) (*cmpConn, error) {
	c, err := net.DialTimeout("tcp", addr, cmpIOTimeout)
	if err != nil {
		return nil, err
	}
	cc := &cmpConn{Conn: c, r: bufio.NewReaderSize(c, 512)}
	_ = c.SetDeadline(time.Now().Add(cmpIOTimeout))
	if _, err := c.Write(mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: mqttwire.Level311, ClientID: id, CleanStart: true})); err != nil {
		c.Close()
		return nil, err
	}
	typ, body, err := cc.readPacket(nil)
	if err == nil && (typ != mqttwire.CONNACK || len(body) != 2 || body[1] != 0) {
		err = fmt.Errorf("CONNACK expected, got type %d body %x", typ, body)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: %w", id, err)
	}
	_ = c.SetDeadline(time.Time{})
	return cc, nil
}

// readPacket reads one whole packet and returns its type and body (the
// bytes after the fixed header), reusing buf when it is large enough.
func (c *cmpConn) readPacket(buf []byte) (byte, []byte, error) {
	b0, err := c.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	var rl, shift uint32
	for i := 0; ; i++ {
		if i == 4 {
			return 0, nil, errors.New("malformed remaining length")
		}
		b, err := c.r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		rl |= uint32(b&0x7f) << shift
		shift += 7
		if b&0x80 == 0 {
			break
		}
	}
	if rl > 1<<20 {
		return 0, nil, fmt.Errorf("packet of %d bytes", rl)
	}
	if cap(buf) < int(rl) {
		buf = make([]byte, rl)
	}
	buf = buf[:rl]
	if _, err := io.ReadFull(c.r, buf); err != nil {
		return 0, nil, err
	}
	return b0 >> 4, buf, nil
}

// subscribe subscribes to topic at QoS 0 and waits for the SUBACK.
func (c *cmpConn) subscribe(topic string) error {
	pkt := appendRemaining([]byte{mqttwire.SUBSCRIBE<<4 | 0x2}, uint32(2+2+len(topic)+1))
	pkt = binary.BigEndian.AppendUint16(pkt, 1)
	pkt = binary.BigEndian.AppendUint16(pkt, uint16(len(topic)))
	pkt = append(pkt, topic...)
	pkt = append(pkt, 0)
	_ = c.SetDeadline(time.Now().Add(cmpIOTimeout))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(pkt); err != nil {
		return err
	}
	typ, body, err := c.readPacket(nil)
	if err != nil {
		return fmt.Errorf("SUBACK: %w", err)
	}
	if typ != mqttwire.SUBACK || len(body) != 3 || body[2] != 0 {
		return fmt.Errorf("SUBACK expected, got type %d body %x", typ, body)
	}
	return nil
}

// disconnect sends DISCONNECT and closes, as a well-behaved device leaves.
func (c *cmpConn) disconnect() {
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.Write(mqttwire.AppendDisconnect(nil, mqttwire.Level311, mqttwire.Success))
	c.Close()
}

// appendPublish appends a QoS 0 PUBLISH.
func appendPublish(dst []byte, topic string, payload []byte) []byte {
	dst = appendRemaining(append(dst, mqttwire.PUBLISH<<4), uint32(2+len(topic)+len(payload)))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(topic)))
	dst = append(dst, topic...)
	return append(dst, payload...)
}

// publishPayload returns the payload of a QoS 0 PUBLISH body.
func publishPayload(body []byte) []byte {
	if len(body) < 2 {
		return nil
	}
	n := 2 + int(binary.BigEndian.Uint16(body))
	if n > len(body) {
		return nil
	}
	return body[n:]
}

func appendRemaining(dst []byte, v uint32) []byte {
	for {
		b := byte(v & 0x7f)
		v >>= 7
		if v == 0 {
			return append(dst, b)
		}
		dst = append(dst, b|0x80)
	}
}

// forEach runs do(i) for i in [0, n) with at most inflight calls at once,
// and returns how many failed and the first error.
func forEach(n, inflight int, do func(i int) error) (int, error) {
	var next, failed atomic.Int64
	var first error
	var once sync.Once
	var wg sync.WaitGroup
	for range min(n, inflight) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := do(i); err != nil {
					failed.Add(1)
					once.Do(func() { first = err })
				}
			}
		}()
	}
	wg.Wait()
	return int(failed.Load()), first
}

// procCPU is the user+system CPU the process has used, all threads
// included (/proc/<pid>/stat utime and stime, in clock ticks of 10 ms).
func procCPU(pid int) (time.Duration, error) {
	user, sys, err := procTimes(pid)
	return user + sys, err
}

// procTimes is the process's user and system CPU apart (procCPU).
func procTimes(pid int) (user, sys time.Duration, err error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// The command name is in parentheses and may contain spaces: the
	// fields that follow start after the last ')'. Fields 14 and 15
	// (utime, stime) are the 12th and 13th after it.
	i := strings.LastIndexByte(string(raw), ')')
	f := strings.Fields(string(raw[i+1:]))
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, 0, err
	}
	const tick = 10 * time.Millisecond // USER_HZ is 100 on Linux
	return time.Duration(ut) * tick, time.Duration(st) * tick, nil
}

// cpuOf sums procCPU over pids.
func cpuOf(pids []int) (time.Duration, error) {
	var sum time.Duration
	for _, p := range pids {
		d, err := procCPU(p)
		if err != nil {
			return 0, err
		}
		sum += d
	}
	return sum, nil
}

func procFds(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

// waitFds waits until pid holds at most limit fds: the proxy has closed
// the connections of the previous workload, so its CPU for them is spent
// and they do not count in the next one.
func waitFds(pid, limit int, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		n, err := procFds(pid)
		if err != nil || n <= limit {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d still holds %d fds after %s (want ≤ %d)", pid, n, within, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// percentile returns the p-th percentile (0 < p ≤ 100) of sorted by the
// nearest-rank method; 0 for no samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(p/100*float64(len(sorted)) + 0.999999)
	return sorted[min(max(rank, 1), len(sorted))-1]
}

func sortDurations(d []time.Duration) []time.Duration {
	slices.Sort(d)
	return d
}
