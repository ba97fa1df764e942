//go:build !linux

package loadgen

import "syscall"

func dialControl(_, _ string, _ syscall.RawConn) error { return nil }

func agentSysProcAttr() *syscall.SysProcAttr { return nil }
