package servertest

import "syscall"

// sysProcAttr has the kernel kill the server if the test binary dies without
// running its cleanups (a panic in another goroutine, a -timeout abort), so
// no server outlives its test holding ports.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
