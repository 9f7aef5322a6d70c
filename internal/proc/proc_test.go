package proc

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestStopEndsTheProcessGroup: Stop ends the child and the worker it forked
// (the promise of the package: nothing outlives the process it started), and
// the child's output lands in its log.
func TestStopEndsTheProcessGroup(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "worker.pid")
	// The child forks a worker, records its pid, says so and waits; TERM is
	// ignored by neither, so Stop's SIGTERM to the group ends both.
	script := `sleep 600 & echo $! > ` + pidFile + `; echo started; wait`
	p, err := Start("sh", dir, filepath.Join(dir, "sh.log"), nil, "/bin/sh", "-c", script)
	if err != nil {
		t.Fatal(err)
	}
	var worker int
	for deadline := time.Now().Add(30 * time.Second); ; {
		b, _ := os.ReadFile(pidFile)
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && strings.Contains(p.Tail(5), "started") {
			worker = n
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("child did not start its worker; log: %q", p.Tail(5))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if p.Exited() || p.Err() != nil {
		t.Fatalf("child ended early: %v", p.Err())
	}
	p.Stop(10 * time.Second)
	if !p.Exited() || p.Err() == nil {
		t.Fatalf("after Stop: exited %v, err %v; want a process ended by a signal", p.Exited(), p.Err())
	}
	// The worker was in the child's group: it is gone, or at most a zombie
	// awaiting reaping by init, and a signal to it fails or finds no one.
	for deadline := time.Now().Add(30 * time.Second); syscall.Kill(worker, 0) == nil && !isZombie(worker); {
		if time.Now().After(deadline) {
			t.Fatalf("worker %d outlived Stop", worker)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z'
}

func TestTailSkipsAndCounts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte("a\nnoise b\nc\nd\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := Tail(path, 2, "noise"); got != "c\nd" {
		t.Errorf("Tail(2, noise) = %q, want %q", got, "c\nd")
	}
	if got := Tail(path, 10, "noise"); got != "a\nc\nd" {
		t.Errorf("Tail(10, noise) = %q, want %q", got, "a\nc\nd")
	}
	if got := Tail(filepath.Join(path, "missing"), 1, ""); !strings.Contains(got, "cannot read") {
		t.Errorf("Tail of a missing file = %q, want a note that it cannot be read", got)
	}
}
