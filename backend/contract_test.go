package backend

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"math/big"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

var update = flag.Bool("update", false, "rewrite testdata/contract-v1*.json from the implementation (after checking it against the reference)")

// contractShardCounts are the shard counts every vector is pinned for.
var contractShardCounts = []int{1, 2, 3, 7, 16, 64, 1000}

const (
	vectorsFile = "testdata/contract-v1.json"
	extraFile   = "testdata/contract-v1-extra.json"
	docFile     = "../docs/routing-contract.md"
)

// contractClientIDs are the pinned client IDs: empty, short, typical device
// IDs, the XXH64 block boundaries (4, 8, 31/32/33, 63/64/65 bytes), unicode
// in several scripts, control characters and other binary-looking but valid
// UTF-8 (MQTT forbids only U+0000 [MQTT-1.5.3-2]), and long IDs.
func contractClientIDs() []string {
	return []string{
		"",
		"a",
		"abc",
		"0",
		"1",
		" ",
		"asdf",
		"8bytes!!",
		"client-1",
		"client-2",
		"device-0001",
		"device-0002",
		"sensor/42",
		"shardgate",
		"UPPER",
		"upper",
		"mosquitto_pub",
		"paho12345",
		"MQTT_FX_Client",
		"ESP32-A4CF12345678",
		"d:org-1:thermostat:00-11-22-33-44-55",
		"00000000-0000-0000-0000-000000000000",
		"550e8400-e29b-41d4-a716-446655440000",
		"  leading and trailing  ",
		strings.Repeat("7", 23), // the MQTT 3.1.1 guaranteed maximum [MQTT-3.1.3-5]
		strings.Repeat("b", 31),
		strings.Repeat("c", 32),
		strings.Repeat("d", 33),
		"Call me Ishmael. Some years ago--never mind how long precisely-",
		strings.Repeat("e", 64),
		strings.Repeat("f", 65),
		"ünïcödé",
		"设备-001",
		"Ελληνικά",
		"日本語のクライアント",
		"🚀rocket",
		"emoji👍🏽mix",
		"\u200b",
		"\ufeffbom",
		"a\tb\nc\r",
		"\x01\x02\x03\x7f",
		"\u0080\u00ff\u0100",
		"\ufffd",
		"\U0010ffff",
		"quote\"backslash\\",
		"<html>&amp;",
		strings.Repeat("0123456789", 25) + "abcdef", // 256 bytes
		strings.Repeat("xyz/", 250),                 // 1000 bytes
		strings.Repeat("é", 2048),                   // 4096 bytes
	}
}

type contractVector struct {
	ClientID string   `json:"client_id"`
	XXHash64 string   `json:"xxhash64"`
	Shards   shardMap `json:"shards"`
}

// shardMap is shard count → shard, written in numeric order of the count so
// the file reads well (encoding/json sorts map keys as strings).
type shardMap map[int]int

func (m shardMap) MarshalJSON() ([]byte, error) {
	keys := make([]int, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%q:%d", strconv.Itoa(k), m[k])
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (m *shardMap) UnmarshalJSON(b []byte) error {
	var raw map[string]int
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	*m = make(shardMap, len(raw))
	for k, v := range raw {
		n, err := strconv.Atoi(k)
		if err != nil {
			return fmt.Errorf("shard count %q: %w", k, err)
		}
		(*m)[n] = v
	}
	return nil
}

type sourceKeyVector struct {
	Addr     string   `json:"addr"`
	Key      string   `json:"key"` // hex
	XXHash64 string   `json:"xxhash64"`
	Shards   shardMap `json:"shards"`
}

type rendezvousVector struct {
	InstanceID string `json:"instance_id"`
	Key        string `json:"key"`
	Weight     string `json:"weight"` // hex XXH64(instance_id + "\x00" + key)
}

type extraVectors struct {
	SourceKeys []sourceKeyVector  `json:"source_keys"`
	Rendezvous []rendezvousVector `json:"rendezvous"`
}

func contractSourceAddrs() []string {
	return []string{"127.0.0.1", "192.0.2.7", "::ffff:192.0.2.7", "10.255.255.254", "::1", "2001:db8::1", "fe80::1%eth0"}
}

func contractRendezvous() []rendezvousVector {
	var out []rendezvousVector
	for _, inst := range []string{"broker-a", "broker-b", "node1/mqtt-broker-0", ""} {
		for _, key := range []string{"", "client-1", "设备-001"} {
			out = append(out, rendezvousVector{InstanceID: inst, Key: key})
		}
	}
	return out
}

func hex64(h uint64) string { return fmt.Sprintf("%016x", h) }

// shardsFor computes the pinned shard of h for every shard count with the
// implementation under test.
func shardsFor(h uint64) shardMap {
	m := shardMap{}
	for _, n := range contractShardCounts {
		m[n] = JumpHash(h, n)
	}
	return m
}

func buildVectors() ([]contractVector, extraVectors) {
	var vs []contractVector
	for _, id := range contractClientIDs() {
		h := KeyHash([]byte(id))
		m := shardMap{}
		for _, n := range contractShardCounts {
			m[n] = ShardOf([]byte(id), n)
		}
		vs = append(vs, contractVector{ClientID: id, XXHash64: hex64(h), Shards: m})
	}
	var ex extraVectors
	for _, a := range contractSourceAddrs() {
		key := SourceKey(netip.MustParseAddr(a))
		ex.SourceKeys = append(ex.SourceKeys, sourceKeyVector{Addr: a, Key: hex.EncodeToString(key), XXHash64: hex64(KeyHash(key)), Shards: shardsFor(KeyHash(key))})
	}
	for _, r := range contractRendezvous() {
		r.Weight = hex64(RendezvousWeight(r.InstanceID, []byte(r.Key)))
		ex.Rendezvous = append(ex.Rendezvous, r)
	}
	return vs, ex
}

// marshalVectors writes one JSON object per line, so the file reads (and
// diffs) as a table.
func marshalVectors(v any) []byte {
	var b bytes.Buffer
	writeList := func(indent string, list any) {
		var items []json.RawMessage
		if err := json.Unmarshal(compactJSON(list), &items); err != nil {
			panic(err)
		}
		b.WriteString("[\n")
		for i, it := range items {
			b.WriteString(indent + "  ")
			b.Write(it)
			if i < len(items)-1 {
				b.WriteByte(',')
			}
			b.WriteByte('\n')
		}
		b.WriteString(indent + "]")
	}
	switch v := v.(type) {
	case extraVectors:
		b.WriteString("{\n  \"source_keys\": ")
		writeList("  ", v.SourceKeys)
		b.WriteString(",\n  \"rendezvous\": ")
		writeList("  ", v.Rendezvous)
		b.WriteString("\n}")
	default:
		writeList("", v)
	}
	b.WriteByte('\n')
	return b.Bytes()
}

func compactJSON(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(err)
	}
	return b.Bytes()
}

// TestContractVectors pins contract v1. The committed vectors are checked
// against the implementation and against refXXH64/refJump, a second
// implementation that shares no code with it. Regenerate (only when the
// contract version changes!) with: go test ./backend -run TestContractVectors -update
func TestContractVectors(t *testing.T) {
	vs, ex := buildVectors()
	// Never write vectors the reference disagrees with.
	checkAgainstReference(t, vs, ex)
	if t.Failed() {
		t.Fatal("implementation disagrees with the reference implementation")
	}
	if *update {
		for file, v := range map[string]any{vectorsFile: vs, extraFile: ex} {
			if err := os.WriteFile(file, marshalVectors(v), 0o644); err != nil {
				t.Fatal(err)
			}
			t.Logf("wrote %s", file)
		}
		t.Logf("known-answer table for %s:\n%s", docFile, docTable(vs))
	}

	var got []contractVector
	readJSON(t, vectorsFile, &got)
	if len(got) < 40 {
		t.Fatalf("%s has %d vectors, want at least 40", vectorsFile, len(got))
	}
	for _, v := range got {
		if !utf8.ValidString(v.ClientID) || strings.ContainsRune(v.ClientID, 0) {
			t.Errorf("vector %q is not a valid MQTT client ID", v.ClientID)
		}
		if n := len(v.Shards); n != len(contractShardCounts) {
			t.Errorf("vector %q has %d shard counts, want %d", v.ClientID, n, len(contractShardCounts))
		}
		if h := hex64(KeyHash([]byte(v.ClientID))); h != v.XXHash64 {
			t.Errorf("KeyHash(%q) = %s, pinned %s", v.ClientID, h, v.XXHash64)
		}
		if h := hex64(refXXH64([]byte(v.ClientID), 0)); h != v.XXHash64 {
			t.Errorf("refXXH64(%q) = %s, pinned %s", v.ClientID, h, v.XXHash64)
		}
		for n, want := range v.Shards {
			if s := ShardOf([]byte(v.ClientID), n); s != want {
				t.Errorf("ShardOf(%q, %d) = %d, pinned %d", v.ClientID, n, s, want)
			}
			if s := refJump(refXXH64([]byte(v.ClientID), 0), n); s != want {
				t.Errorf("refJump(%q, %d) = %d, pinned %d", v.ClientID, n, s, want)
			}
		}
	}
	// Every pinned ID is in the file: a vector can't silently disappear.
	pinned := map[string]bool{}
	for _, v := range got {
		pinned[v.ClientID] = true
	}
	for _, id := range contractClientIDs() {
		if !pinned[id] {
			t.Errorf("client ID %q missing from %s", id, vectorsFile)
		}
	}

	var gotEx extraVectors
	readJSON(t, extraFile, &gotEx)
	if len(gotEx.SourceKeys) == 0 || len(gotEx.Rendezvous) == 0 {
		t.Fatalf("%s is incomplete", extraFile)
	}
	for _, v := range gotEx.SourceKeys {
		key := SourceKey(netip.MustParseAddr(v.Addr))
		if k := hex.EncodeToString(key); k != v.Key {
			t.Errorf("SourceKey(%s) = %s, pinned %s", v.Addr, k, v.Key)
		}
		if h := hex64(refXXH64(key, 0)); h != v.XXHash64 {
			t.Errorf("refXXH64(SourceKey(%s)) = %s, pinned %s", v.Addr, h, v.XXHash64)
		}
		for n, want := range v.Shards {
			if s := ShardOf(key, n); s != want {
				t.Errorf("ShardOf(SourceKey(%s), %d) = %d, pinned %d", v.Addr, n, s, want)
			}
			if s := refJump(refXXH64(key, 0), n); s != want {
				t.Errorf("refJump(SourceKey(%s), %d) = %d, pinned %d", v.Addr, n, s, want)
			}
		}
	}
	for _, v := range gotEx.Rendezvous {
		if w := hex64(RendezvousWeight(v.InstanceID, []byte(v.Key))); w != v.Weight {
			t.Errorf("RendezvousWeight(%q, %q) = %s, pinned %s", v.InstanceID, v.Key, w, v.Weight)
		}
		if w := hex64(refXXH64([]byte(v.InstanceID+"\x00"+v.Key), 0)); w != v.Weight {
			t.Errorf("refXXH64(%q+NUL+%q) = %s, pinned %s", v.InstanceID, v.Key, w, v.Weight)
		}
	}
}

func checkAgainstReference(t *testing.T, vs []contractVector, ex extraVectors) {
	t.Helper()
	for _, v := range vs {
		h := refXXH64([]byte(v.ClientID), 0)
		if hex64(h) != v.XXHash64 {
			t.Errorf("KeyHash(%q) = %s, reference %016x", v.ClientID, v.XXHash64, h)
		}
		for n, s := range v.Shards {
			if r := refJump(h, n); r != s {
				t.Errorf("ShardOf(%q, %d) = %d, reference %d", v.ClientID, n, s, r)
			}
		}
	}
	for _, v := range ex.SourceKeys {
		key, _ := hex.DecodeString(v.Key)
		for n, s := range v.Shards {
			if r := refJump(refXXH64(key, 0), n); r != s {
				t.Errorf("source key %s shards %d = %d, reference %d", v.Addr, n, s, r)
			}
		}
	}
	for _, v := range ex.Rendezvous {
		if w := hex64(refXXH64([]byte(v.InstanceID+"\x00"+v.Key), 0)); w != v.Weight {
			t.Errorf("RendezvousWeight(%q, %q) = %s, reference %s", v.InstanceID, v.Key, v.Weight, w)
		}
	}
}

func readJSON(t *testing.T, file string, v any) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v (generate with: go test ./backend -run TestContractVectors -update)", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

// docTable renders the short vectors as the markdown table of
// docs/routing-contract.md.
func docTable(vs []contractVector) string {
	var b strings.Builder
	b.WriteString("| client ID | xxhash64 |")
	for _, n := range contractShardCounts {
		fmt.Fprintf(&b, " %d |", n)
	}
	b.WriteString("\n|---|---|")
	for range contractShardCounts {
		b.WriteString("--:|")
	}
	b.WriteString("\n")
	for _, v := range vs {
		if len(v.ClientID) > 40 || strings.ContainsAny(v.ClientID, "|`") {
			continue
		}
		fmt.Fprintf(&b, "| `%s` | %s |", strconv.Quote(v.ClientID), v.XXHash64)
		for _, n := range contractShardCounts {
			fmt.Fprintf(&b, " %d |", v.Shards[n])
		}
		b.WriteString("\n")
	}
	return b.String()
}

// TestContractDocTable checks that the known-answer table in
// docs/routing-contract.md agrees with the implementation, so the document
// other programs are built from cannot drift from the code.
func TestContractDocTable(t *testing.T) {
	b, err := os.ReadFile(docFile)
	if err != nil {
		t.Fatalf("%s: %v", filepath.Clean(docFile), err)
	}
	rows, weights := 0, 0
	for line := range strings.Lines(string(b)) {
		// | `broker-a` | `client-1` | c2e8b50f961e33ce |
		if f := strings.Split(strings.TrimSpace(line), "|"); len(f) == 5 && strings.HasPrefix(strings.TrimSpace(f[2]), "`") {
			id, key := strings.Trim(strings.TrimSpace(f[1]), "`"), strings.Trim(strings.TrimSpace(f[2]), "`")
			if got, want := strings.TrimSpace(f[3]), hex64(refXXH64([]byte(id+"\x00"+key), 0)); got != want {
				t.Errorf("doc rendezvous row %q/%q: weight %s, want %s", id, key, got, want)
			}
			weights++
			continue
		}
		// | `"client-1"` | a810f56f947b32f3 | 0 | 0 | 0 | 0 | 9 | 25 | 662 |
		f := strings.Split(strings.TrimSpace(line), "|")
		if len(f) != 2+2+len(contractShardCounts) || !strings.HasPrefix(strings.TrimSpace(f[1]), "`") {
			continue
		}
		id, err := strconv.Unquote(strings.Trim(strings.TrimSpace(f[1]), "`"))
		if err != nil {
			t.Errorf("doc row %q: client ID: %v", line, err)
			continue
		}
		rows++
		if got, want := strings.TrimSpace(f[2]), hex64(refXXH64([]byte(id), 0)); got != want {
			t.Errorf("doc row %q: xxhash64 %s, want %s", id, got, want)
		}
		for i, n := range contractShardCounts {
			got, err := strconv.Atoi(strings.TrimSpace(f[3+i]))
			if want := ShardOf([]byte(id), n); err != nil || got != want {
				t.Errorf("doc row %q: shards=%d: %q, want %d", id, n, f[3+i], want)
			}
		}
	}
	if rows < 10 || weights < 3 {
		t.Errorf("%s: found %d known-answer rows and %d rendezvous weights, want at least 10 and 3", docFile, rows, weights)
	}
}

// TestXXH64Reference checks the reference implementation itself against the
// published XXH64 test values.
func TestXXH64Reference(t *testing.T) {
	for _, tt := range []struct {
		in   string
		seed uint64
		want uint64
	}{
		{"", 0, 0xef46db3751d8e999},
		{"a", 0, 0xd24ec4f1a98c6e5b},
		{"as", 0, 0x1c330fb2d66be179},
		{"asd", 0, 0x631c37ce72a97393},
		{"asdf", 0, 0x415872f599cea71e},
		{"Call me Ishmael. Some years ago--never mind how long precisely-", 0, 0x02a2e85470d6fd96},
		{"", 123, 0xe0db84de91f3e198},
	} {
		if got := refXXH64([]byte(tt.in), tt.seed); got != tt.want {
			t.Errorf("refXXH64(%q, %d) = %016x, want %016x", tt.in, tt.seed, got, tt.want)
		}
	}
}

// TestJumpReference compares JumpHash with refJump over many random keys
// and with the paper's worked property: bucket counts 1 always give 0.
func TestJumpReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	n := 200000
	if testing.Short() {
		n = 20000
	}
	for range n {
		h := r.Uint64()
		buckets := 1 + r.IntN(1<<16)
		if got, want := JumpHash(h, buckets), refJump(h, buckets); got != want {
			t.Fatalf("JumpHash(%#x, %d) = %d, reference %d", h, buckets, got, want)
		}
		if JumpHash(h, 1) != 0 {
			t.Fatalf("JumpHash(%#x, 1) != 0", h)
		}
	}
	if JumpHash(1, 0) != -1 || ShardOf([]byte("x"), -3) != -1 {
		t.Error("shards < 1 must give -1")
	}
}

// TestJumpPublished checks JumpHash against values generated from the
// paper's reference C++ code (published with github.com/dgryski/go-jump):
// key, then the bucket for 1, 2, 3, ... buckets.
func TestJumpPublished(t *testing.T) {
	for _, tt := range []struct {
		key     uint64
		buckets []int
	}{
		{0, []int{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
		{1, []int{0, 0, 0, 0, 0, 0, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 17, 17}},
		{0xdeadbeef, []int{0, 1, 2, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 16, 16, 16}},
		{0x0ddc0ffeebadf00d, []int{0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 15, 15, 15, 15}},
	} {
		for i, want := range tt.buckets {
			if got := JumpHash(tt.key, i+1); got != want {
				t.Errorf("JumpHash(%#x, %d) = %d, want %d", tt.key, i+1, got, want)
			}
			if got := refJump(tt.key, i+1); got != want {
				t.Errorf("refJump(%#x, %d) = %d, want %d", tt.key, i+1, got, want)
			}
		}
	}
}

// TestJumpExactRational shows that the integer form floor((b+1)·2^31/x),
// which another program might be tempted to write, agrees with the binary64
// contract on the pinned shard counts for random keys: the arithmetic
// matters only on rare inputs (docs/routing-contract.md).
func TestJumpExactRational(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	n := 100000
	if testing.Short() {
		n = 10000
	}
	for range n {
		h := r.Uint64()
		for _, buckets := range contractShardCounts {
			if got, want := JumpHash(h, buckets), ratJump(h, buckets); got != want {
				t.Fatalf("JumpHash(%#x, %d) = %d, exact rational %d", h, buckets, got, want)
			}
		}
	}
}

// FuzzShardOf checks the implementation against the reference for any key.
func FuzzShardOf(f *testing.F) {
	for _, id := range contractClientIDs() {
		f.Add([]byte(id), 16)
	}
	f.Fuzz(func(t *testing.T, key []byte, shards int) {
		shards = 1 + int(uint(shards)%100000)
		if got, want := ShardOf(key, shards), refJump(refXXH64(key, 0), shards); got != want {
			t.Fatalf("ShardOf(%x, %d) = %d, reference %d", key, shards, got, want)
		}
	})
}

// refXXH64 is XXH64 transcribed from the xxHash specification
// (doc/xxhash_spec.md, "XXH64 algorithm description"), written without
// reference to the library the implementation uses.
func refXXH64(in []byte, seed uint64) uint64 {
	const (
		p1 uint64 = 0x9E3779B185EBCA87
		p2 uint64 = 0xC2B2AE3D27D4EB4F
		p3 uint64 = 0x165667B19E3779F9
		p4 uint64 = 0x85EBCA77C2B2AE63
		p5 uint64 = 0x27D4EB2F165667C5
	)
	round := func(acc, lane uint64) uint64 {
		acc += lane * p2
		acc = bits.RotateLeft64(acc, 31)
		return acc * p1
	}
	merge := func(acc, v uint64) uint64 {
		acc ^= round(0, v)
		return acc*p1 + p4
	}
	var acc uint64
	rest := in
	if len(in) >= 32 {
		v := [4]uint64{seed + p1 + p2, seed + p2, seed, seed - p1}
		for len(rest) >= 32 {
			for i := range v {
				v[i] = round(v[i], binary.LittleEndian.Uint64(rest[8*i:]))
			}
			rest = rest[32:]
		}
		acc = bits.RotateLeft64(v[0], 1) + bits.RotateLeft64(v[1], 7) + bits.RotateLeft64(v[2], 12) + bits.RotateLeft64(v[3], 18)
		for _, x := range v {
			acc = merge(acc, x)
		}
	} else {
		acc = seed + p5
	}
	acc += uint64(len(in))
	for len(rest) >= 8 {
		acc ^= round(0, binary.LittleEndian.Uint64(rest))
		acc = bits.RotateLeft64(acc, 27)*p1 + p4
		rest = rest[8:]
	}
	if len(rest) >= 4 {
		acc ^= uint64(binary.LittleEndian.Uint32(rest)) * p1
		acc = bits.RotateLeft64(acc, 23)*p2 + p3
		rest = rest[4:]
	}
	for _, c := range rest {
		acc ^= uint64(c) * p5
		acc = bits.RotateLeft64(acc, 11) * p1
	}
	acc ^= acc >> 33
	acc *= p2
	acc ^= acc >> 29
	acc *= p3
	acc ^= acc >> 32
	return acc
}

// refJump is the paper's figure 1 written as the "jump" recursion the paper
// derives it from: from bucket b, the next bucket at which the key moves is
// floor((b+1)/r) for the next pseudo-random r in (0, 1], r =
// ((key>>33)+1)/2^31, with the paper's binary64 arithmetic.
func refJump(key uint64, buckets int) int {
	var next func(b int64, k uint64) int64
	next = func(b int64, k uint64) int64 {
		k = k*2862933555777941757 + 1
		inv := float64(int64(1)<<31) / float64(k>>33+1)
		j := int64(float64(b+1) * inv)
		if j >= int64(buckets) {
			return b
		}
		return next(j, k)
	}
	if buckets < 1 {
		return -1
	}
	return int(next(0, key))
}

// ratJump is jump hash with exact rational arithmetic (math/big), the
// integer form a reimplementation without floating point would use.
func ratJump(key uint64, buckets int) int {
	b, j := int64(-1), int64(0)
	for j < int64(buckets) {
		b = j
		key = key*2862933555777941757 + 1
		num := new(big.Int).Lsh(big.NewInt(b+1), 31)
		j = new(big.Int).Quo(num, new(big.Int).SetUint64(key>>33+1)).Int64()
	}
	return int(b)
}
