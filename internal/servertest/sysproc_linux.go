package servertest

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// sysProcAttr has the kernel kill the server if the test binary dies without
// running its cleanups (a panic in another goroutine, a -timeout abort), so
// no server outlives its test holding ports.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

// raiseFileLimit lifts the server's open-files soft limit to its hard
// limit: Go restores a child's soft limit to the one the test binary
// started with (often 1024), and the tests hold thousands of devices on
// one broker.
func raiseFileLimit(pid int) {
	var rl unix.Rlimit
	if unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		_ = unix.Prlimit(pid, unix.RLIMIT_NOFILE, &rl, nil)
	}
}
