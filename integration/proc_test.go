package integration

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caddy-headless/caddy-headless/internal/proc"
)

// process is a child process of the suite with its output in <dir>/<name>.log.
type process struct {
	*proc.Process
	name, log string
}

// pidFile lists the processes the suite started, so that a later run can end
// the ones a crashed run left behind.
var pidFile = filepath.Join(os.TempDir(), "caddy-headless-e2e.pids")

var pidMu sync.Mutex

// startProcess starts bin with args, output to <dir>/<name>.log. The child
// is in its own process group and is killed if the suite dies.
func startProcess(dir, name string, env []string, bin string, args ...string) (*process, error) {
	p, err := proc.Start(name, dir, filepath.Join(dir, name+".log"), env, bin, args...)
	if err != nil {
		return nil, err
	}
	pidMu.Lock()
	if pf, err := os.OpenFile(pidFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
		fmt.Fprintf(pf, "%d %s\n", p.Pid(), bin)
		pf.Close()
	}
	pidMu.Unlock()
	return &process{Process: p, name: name, log: p.Log}, nil
}

func (p *process) exited() bool { return p.Exited() }

// stop ends the process group: SIGTERM, then SIGKILL after 10s.
func (p *process) stop() {
	if p != nil {
		p.Stop(10 * time.Second)
	}
}

// tail returns the last n lines of the process's log.
func (p *process) tail(n int) string { return p.Tail(n) }

func tailFile(path string, n int) string { return proc.Tail(path, n, "") }

func tailFiltered(path string, n int, skip string) string { return proc.Tail(path, n, skip) }

// killLeftovers ends processes that a previous, crashed run of the suite
// started (recorded in pidFile), if they still run the same binary.
func killLeftovers() {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		pidStr, bin, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 1 {
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || strings.TrimSuffix(exe, " (deleted)") != bin {
			continue
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	os.Remove(pidFile)
}

// freePort returns a TCP port on 127.0.0.1 that is free right now (and,
// for DNS, free for UDP as well).
func freePort() (int, error) {
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err != nil {
			continue
		}
		u.Close()
		return port, nil
	}
	return 0, errors.New("no free port on 127.0.0.1")
}

// run runs a command and returns its combined output, with the command line
// in the error.
func run(name string, args ...string) (string, error) {
	return runInput(nil, name, args...)
}

func runInput(stdin []byte, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// waitFor polls cond until it returns nil or the timeout passes, and returns
// the last error.
func waitFor(timeout, every time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %v: %w", timeout, err)
		}
		time.Sleep(every)
	}
}
