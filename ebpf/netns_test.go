package ebpf

import (
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// skipUnprivileged skips a test that lacks a privilege or kernel feature,
// naming what it needs, but fails it when SHARDGATE_REQUIRE_PRIVILEGED=1 (CI
// runs as root, where a skip would hide a broken test).
func skipUnprivileged(t *testing.T, need, format string, args ...any) {
	t.Helper()
	if os.Getenv("SHARDGATE_REQUIRE_PRIVILEGED") == "1" {
		t.Fatalf("SHARDGATE_REQUIRE_PRIVILEGED=1: "+format, args...)
	}
	t.Skipf("needs "+need+": "+format, args...)
}

// enterLoopbackNetns moves the test goroutine's thread into a fresh network
// namespace with lo up. The thread is never unlocked, so the runtime
// destroys it with the test goroutine and no other goroutine ever runs in
// the namespace. Sockets belong to the namespace of the thread that creates
// them: open them on the test goroutine. No subtests.
func enterLoopbackNetns(t *testing.T, need string) {
	t.Helper()
	host, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		skipUnprivileged(t, need, "unshare(CLONE_NEWNET): %v", err)
	}
	if ns, err := os.Readlink("/proc/thread-self/ns/net"); err != nil || ns == host {
		t.Fatalf("still in the host network namespace (%s, %v)", ns, err)
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatalf("SIOCGIFFLAGS lo: %v", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		skipUnprivileged(t, need, "set lo up: %v", err)
	}
}
