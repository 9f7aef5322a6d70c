package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddy-headless/caddy-headless/kubestore/storagetest"
)

// The storage tests authenticate as a service account bound to exactly the
// Role the README ships (read from README.md, so the README cannot drift),
// on the suite's kube-apiserver in RBAC mode.

const storageNS = "caddy-storage"

// readmeRole is the Role of the README's storage section: the YAML block
// after the <!-- storage-k8s-role --> marker.
func readmeRole(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(b), "<!-- storage-k8s-role -->")
	if !ok {
		t.Fatal("README.md has no <!-- storage-k8s-role --> marker before the storage Role")
	}
	m := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindStringSubmatch(after)
	if m == nil {
		t.Fatal("no ```yaml block after the README's storage Role marker")
	}
	return m[1]
}

// storageAccount makes namespace ns with the service account "caddy" bound
// to the README's Role and returns a file with a token of it.
func (s *suite) storageAccount(t *testing.T, ns string) string {
	t.Helper()
	role := readmeRole(t)
	for _, want := range []string{"kind: Role\n", "name: caddy-storage", "kind: RoleBinding", "name: caddy\n"} {
		if !strings.Contains(role, want) {
			t.Fatalf("the README's Role block lacks %q:\n%s", want, role)
		}
	}
	if strings.Contains(role, "ClusterRole") {
		t.Fatal("the README's storage RBAC must not be cluster-wide")
	}
	s.apply(t,
		fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n", ns),
		fmt.Sprintf("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: caddy\n  namespace: %s\n", ns))
	var docs []string
	for _, d := range strings.Split(role, "\n---\n") {
		docs = append(docs, strings.ReplaceAll(d, "namespace: caddy-system", "namespace: "+ns))
	}
	s.apply(t, docs...)
	tok := s.kubectl(t, "-n", ns, "create", "token", "caddy", "--duration=2h")
	f := filepath.Join(s.dir, "token-"+ns)
	if err := os.WriteFile(f, []byte(strings.TrimSpace(tok)), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// storageConfig is a storage Config on the suite's apiserver with short
// intervals: lease 3 s, renewed every 500 ms, waiters look every 100 ms.
func (s *suite) storageConfig(ns, token string) kubestore.Config {
	return kubestore.Config{
		Endpoint: s.apiURL, CAFile: s.caFile, TokenFile: token, Namespace: ns,
		Prefix: "caddy", Identity: "e2e",
		LeaseDuration: 3 * time.Second, RenewInterval: 500 * time.Millisecond,
		RequestTimeout: 5 * time.Second, PollInterval: 100 * time.Millisecond,
	}
}

// TestStorageContract runs the storage contract (the same tests the unit
// tests run on the fake) on kube-apiserver, as the README's Role.
func TestStorageContract(t *testing.T) {
	s := requireSuite(t)
	token := s.storageAccount(t, storageNS)
	storagetest.Run(t, storagetest.Env{Config: func(t *testing.T) kubestore.Config { return s.storageConfig(storageNS, token) }})

	t.Run("OtherNamespaceRefused", func(t *testing.T) {
		c := s.storageConfig("default", token)
		st, err := kubestore.New(c, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = st.Store(context.Background(), "k", []byte("v"))
		for _, want := range []string{"403", `"get"`, `"secrets"`, `"default"`} {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("Store in another namespace: %v; want a refusal naming %s", err, want)
			}
		}
		if err := st.Lock(context.Background(), "l"); err == nil || !strings.Contains(err.Error(), `"leases"`) {
			t.Fatalf("Lock in another namespace: %v; want a refusal naming leases", err)
		}
	})
}

// runLockHolder is a child process: it takes the lock of the config in
// cfgJSON, says "locked" and waits to be killed.
func runLockHolder(cfgJSON string) {
	var c kubestore.Config
	if err := json.Unmarshal([]byte(cfgJSON), &c); err != nil {
		fmt.Println("bad config:", err)
		os.Exit(2)
	}
	st, err := kubestore.New(c, nil)
	if err == nil {
		err = st.Lock(context.Background(), "issue_cert_killed.example.com")
	}
	if err != nil {
		fmt.Println("lock:", err)
		os.Exit(2)
	}
	fmt.Println("locked")
	select {}
}

// TestStorageKilledHolderIsTakenOver: a process holding a lock is killed
// (SIGKILL: no Unlock, no cleanup). Another replica gets the lock once the
// Lease went unrenewed for lease_duration, not before.
func TestStorageKilledHolderIsTakenOver(t *testing.T) {
	s := requireSuite(t)
	token := s.storageAccount(t, storageNS)
	c := s.storageConfig(storageNS, token)
	c.Prefix = "killed"
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "E2E_LOCK_HOLDER="+string(b))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line := make([]byte, 64)
	n, _ := out.Read(line)
	if !strings.HasPrefix(string(line[:n]), "locked") {
		t.Fatalf("lock holder: %q", line[:n])
	}
	c.Identity = "survivor"
	st, err := kubestore.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := st.TryLock(context.Background(), "issue_cert_killed.example.com"); ok || err != nil {
		t.Fatalf("TryLock while the holder lives = %v, %v", ok, err)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	_ = cmd.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := st.Lock(ctx, "issue_cert_killed.example.com"); err != nil {
		t.Fatal(err)
	}
	took := time.Since(killed)
	t.Logf("takeover %v after SIGKILL of the holder (lease_duration %v, renew %v, poll %v)", took.Round(time.Millisecond), c.LeaseDuration, c.RenewInterval, c.PollInterval)
	// The holder renewed at most renew_interval before it died; the lock
	// is free lease_duration after that renewal, seen within one poll.
	if took < c.LeaseDuration-c.RenewInterval {
		t.Fatalf("taken over %v after the kill: before lease_duration %v could have passed", took, c.LeaseDuration)
	}
	// A correctness bound, not a speed claim: lease_duration + one poll,
	// plus generous room for a loaded machine.
	if bound := c.LeaseDuration + c.PollInterval + 5*time.Second; took > bound {
		t.Fatalf("taken over only %v after the kill (bound %v)", took, bound)
	}
	if err := st.Unlock(context.Background(), "issue_cert_killed.example.com"); err != nil {
		t.Fatal(err)
	}
}

// TestStorageHolderSurvivesAPIServerRestart: kube-apiserver is down for
// longer than lease_duration while a lock is held. Afterwards the holder
// still has it (its heartbeat resumes), and a waiter that watched the
// whole time does not take it.
func TestStorageHolderSurvivesAPIServerRestart(t *testing.T) {
	s := requireSuite(t)
	token := s.storageAccount(t, storageNS)
	c := s.storageConfig(storageNS, token)
	c.Prefix = "restart"
	holder, err := kubestore.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Identity = "waiter"
	waiter, err := kubestore.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := holder.Lock(ctx, "issue_cert_restart.example.com"); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	took := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				took <- nil
				return
			default:
			}
			if ok, _ := waiter.TryLock(ctx, "issue_cert_restart.example.com"); ok {
				took <- errors.New("the waiter took the lock from a live holder")
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	down := time.Now()
	s.apiSrv.stop()
	time.Sleep(c.LeaseDuration + time.Second)
	if err := s.runAPIServer(); err != nil {
		t.Fatalf("restarting kube-apiserver: %v", err)
	}
	t.Logf("kube-apiserver was down for %v (lease_duration %v)", time.Since(down).Round(time.Millisecond), c.LeaseDuration)
	time.Sleep(2 * c.LeaseDuration) // the waiter watches the renewed Lease
	close(stop)
	if err := <-took; err != nil {
		t.Fatal(err)
	}
	if err := holder.Unlock(ctx, "issue_cert_restart.example.com"); err != nil {
		t.Fatalf("the holder's Unlock after the restart: %v (it lost the lock)", err)
	}
}
