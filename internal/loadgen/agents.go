package loadgen

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"time"
)

// AgentStopGrace is how long RunAgents waits for an interrupted agent to
// close its devices and report before killing it.
const AgentStopGrace = 30 * time.Second

// RunAgents runs each job in its own child process, `exe bench agent`,
// which reads the Job as JSON on stdin and writes its Report as JSON on
// stdout: one process holds at most ~19000 sockets here, so a fleet of
// 100k devices needs several. The children die with this process
// (Pdeathsig). When ctx ends, each agent gets SIGINT, ends its job early
// (closing its devices) and still reports; one that has not exited
// AgentStopGrace later is killed. Their stderr goes to ours. Reports come
// back in the order of jobs; an agent that failed leaves its report zero
// and adds to the error.
func RunAgents(ctx context.Context, exe string, jobs []Job) ([]Report, error) {
	reports := make([]Report, len(jobs))
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		in, err := json.Marshal(j)
		if err != nil {
			return nil, err
		}
		cmd := exec.CommandContext(ctx, exe, "bench", "agent")
		cmd.Stdin = bytes.NewReader(in)
		var out bytes.Buffer
		cmd.Stdout = &out
		cmd.Stderr = os.Stderr
		cmd.SysProcAttr = agentSysProcAttr()
		cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
		cmd.WaitDelay = AgentStopGrace
		if err := cmd.Start(); err != nil {
			errs[i] = fmt.Errorf("agent %d: %w", i, err)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			werr := cmd.Wait()
			// After a cancel, Wait reports the context's error even for
			// an agent that stopped cleanly: its report decides.
			if werr != nil && ctx.Err() == nil {
				errs[i] = fmt.Errorf("agent %d (pid %d): %w", i, cmd.Process.Pid, werr)
				return
			}
			if err := json.Unmarshal(out.Bytes(), &reports[i]); err != nil {
				errs[i] = fmt.Errorf("agent %d (pid %d): report: %w", i, cmd.Process.Pid, errors.Join(err, werr))
			}
		}()
	}
	wg.Wait()
	return reports, errors.Join(errs...)
}

// ServeAgent is the agent's side of RunAgents: it reads a Job from in, runs
// it and writes the Report to out.
func ServeAgent(ctx context.Context, in io.Reader, out io.Writer) error {
	var j Job
	if err := json.NewDecoder(in).Decode(&j); err != nil {
		return fmt.Errorf("agent: read job: %w", err)
	}
	rep := Run(ctx, j)
	return json.NewEncoder(out).Encode(rep)
}
