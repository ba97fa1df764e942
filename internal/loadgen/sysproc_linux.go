package loadgen

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// dialControl sets IP_BIND_ADDRESS_NO_PORT on a socket bound to a source
// IP, so the kernel picks its port at connect time by the whole 4-tuple:
// one source address then serves ~28k ports per destination, not in total.
func dialControl(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}

// agentSysProcAttr has the kernel kill an agent when its parent dies, so no
// agent outlives a run holding thousands of sockets.
func agentSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
