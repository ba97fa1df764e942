package consultest

import "syscall"

// sysProcAttr has the kernel kill the agent if the test binary dies without
// running its cleanups (a panic in another goroutine, a -timeout abort), so
// no agent outlives its test holding ports.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
