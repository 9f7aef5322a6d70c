package integration

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/kubestore"
)

// Names of TestReplicasShareCertificates. CoreDNS's hosts block points both
// at replica B (127.0.0.12): Pebble's validation always reaches B, whichever
// replica placed the order.
const (
	replicaSite  = "replicas.test.com"
	replicaSite2 = "replicas2.test.com"
)

// replica is one Caddy of the fleet, bound to its own loopback address.
type replica struct {
	name, ip string
	cf, dir  string
	admin    string
	proc     *process
}

func (s *suite) replicaCaddyfile(r *replica, adminPort int, token string) string {
	site := func(name string) string {
		return fmt.Sprintf("%s {\n\trespond \"%s from replica %s\"\n}\n", name, name, r.name)
	}
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	default_bind %s
	http_port %d
	https_port %d
	acme_ca %s
	acme_ca_root %s
	email e2e@test.com
	skip_install_trust
	storage k8s {
		endpoint %s
		ca_file %s
		token_file %s
		namespace %s
		prefix edge
		identity replica-%s
		lease_duration 5s
		renew_interval 1s
	}
}

%s
%s`, adminPort, r.ip, s.httpPort, s.httpsPort, s.acmeDirectory(), s.caFile,
		s.apiURL, s.caFile, token, storageNS, r.name, site(replicaSite), site(replicaSite2))
}

func (s *suite) newReplica(t *testing.T, name, ip, token string) *replica {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	r := &replica{name: name, ip: ip, admin: fmt.Sprintf("http://127.0.0.1:%d", port)}
	if r.dir, err = os.MkdirTemp(s.dir, "replica-"+name+"-"); err != nil {
		t.Fatal(err)
	}
	r.cf = filepath.Join(r.dir, "Caddyfile")
	if err := os.WriteFile(r.cf, []byte(s.replicaCaddyfile(r, port, token)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.proc.stop()
		if t.Failed() {
			t.Logf("----- replica %s log (%s), last lines -----\n%s", name, r.proc.log, tailFiltered(r.proc.log, 40, `"received request"`))
		}
	})
	return r
}

func (r *replica) start(t *testing.T, s *suite) {
	t.Helper()
	var err error
	r.proc, err = startProcess(r.dir, "caddy", []string{"HOME=" + r.dir, "XDG_DATA_HOME=" + r.dir, "XDG_CONFIG_HOME=" + r.dir},
		s.caddyBin, "run", "--config", r.cf, "--adapter", "caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if err := waitFor(30*time.Second, 100*time.Millisecond, func() error {
		if r.proc.exited() {
			return fmt.Errorf("replica %s exited: %v\n%s", r.name, r.proc.Err(), r.proc.tail(20))
		}
		return httpOK(http.DefaultClient, r.admin+"/config/", "")
	}); err != nil {
		t.Fatal(err)
	}
}

// serial is the serial number of the certificate replica r serves for name,
// once it serves one that chains to Pebble's root.
func (s *suite) serial(t *testing.T, r *replica, name string) string {
	t.Helper()
	var serial string
	if err := waitFor(90*time.Second, 200*time.Millisecond, func() error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp",
			net.JoinHostPort(r.ip, fmt.Sprint(s.httpsPort)), &tls.Config{ServerName: name, RootCAs: s.pebbleRoots})
		if err != nil {
			return err
		}
		defer conn.Close()
		serial = conn.ConnectionState().PeerCertificates[0].SerialNumber.Text(16)
		return nil
	}); err != nil {
		t.Fatalf("replica %s serves no certificate from Pebble for %s: %v", r.name, name, err)
	}
	return serial
}

// pebbleLog counts what Pebble logged since mark: new accounts and issued
// certificates.
type pebbleCounts struct{ accounts, issued int }

func (s *suite) pebbleSince(mark int64) pebbleCounts {
	b, _ := os.ReadFile(s.pebble.log)
	if int64(len(b)) < mark {
		mark = 0
	}
	text := string(b[mark:])
	return pebbleCounts{
		accounts: strings.Count(text, "accounts in memory"),
		issued:   len(regexp.MustCompile(`Issued certificate serial`).FindAllString(text, -1)),
	}
}

func (s *suite) pebbleMark() int64 {
	fi, err := os.Stat(s.pebble.log)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// leaseHolder is the holder of the lock name of the fleet, "" if none.
func leaseHolder(st *kubestore.Storage, name string) string {
	h, _ := st.Holder(context.Background(), name)
	return h
}

// TestReplicasShareCertificates: three Caddy processes with storage k8s on
// one apiserver manage the same names. Pebble validates at replica B's
// address while A or C places the order. One ACME account, one certificate
// per name, the same certificate on every replica; restarting all three
// orders nothing; the replica that holds issue_cert mid-order is killed and
// another finishes.
func TestReplicasShareCertificates(t *testing.T) {
	s := requireSuite(t)
	token := s.storageAccount(t, storageNS)
	admin := s.storageConfig(storageNS, token)
	admin.Prefix, admin.Identity, admin.LeaseDuration, admin.RenewInterval = "edge", "test-blocker", 5*time.Second, time.Second
	blocker, err := kubestore.New(admin, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	lock1, lock2 := "issue_cert_"+replicaSite, "issue_cert_"+replicaSite2
	// Hold both names until every replica is up and waiting.
	for _, l := range []string{lock1, lock2} {
		if err := blocker.Lock(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	mark := s.pebbleMark()
	reps := []*replica{
		s.newReplica(t, "a", "127.0.0.11", token),
		s.newReplica(t, "b", "127.0.0.12", token),
		s.newReplica(t, "c", "127.0.0.13", token),
	}
	a, b, c := reps[0], reps[1], reps[2]
	for _, r := range reps {
		r.start(t, s)
	}
	waitLogged := func(r *replica, what string) {
		t.Helper()
		if err := waitFor(30*time.Second, 100*time.Millisecond, func() error {
			if strings.Count(readFile(r.proc.log), what) == 0 {
				return fmt.Errorf("replica %s has not logged %s", r.name, what)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range reps {
		waitLogged(r, `"acquiring lock","identifier":"`+replicaSite+`"`)
	}

	// handOver releases lock from the blocker while B is frozen, so that A
	// or C takes it (B's listener keeps queueing connections while it is
	// stopped, and answers Pebble once it runs again).
	handOver := func(lock string) string {
		t.Helper()
		if err := syscall.Kill(b.proc.Pid(), syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		defer syscall.Kill(b.proc.Pid(), syscall.SIGCONT)
		if err := blocker.Unlock(ctx, lock); err != nil {
			t.Fatal(err)
		}
		var holder string
		if err := waitFor(20*time.Second, 20*time.Millisecond, func() error {
			if holder = leaseHolder(blocker, lock); holder == "" {
				return fmt.Errorf("nobody took %s", lock)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(holder, "replica-a/") && !strings.HasPrefix(holder, "replica-c/") {
			t.Fatalf("%s taken by %s, want replica A or C (B is stopped)", lock, holder)
		}
		return holder
	}
	holder := handOver(lock1)
	t.Logf("%s: the order is placed by %s; Pebble validates at replica B", replicaSite, holder)
	serials := map[string]bool{}
	for _, r := range reps {
		serials[s.serial(t, r, replicaSite)] = true
	}
	t.Logf("apiserver requests of the 3 replicas from their start to the certificate on all of them (lock waits included): %v", sumRequests(t, reps...))
	got := s.pebbleSince(mark)
	t.Logf("first issuance: %d ACME account(s) created, %d certificate(s) issued, %d distinct serial(s) served", got.accounts, got.issued, len(serials))
	if got.accounts != 1 || got.issued != 1 || len(serials) != 1 {
		t.Fatalf("want one account, one certificate, one serial on all replicas; got %+v, serials %v", got, serials)
	}

	// Restart all three: everything comes from the Secrets, no new order.
	mark = s.pebbleMark()
	for _, r := range reps {
		r.proc.stop()
	}
	for _, r := range reps {
		r.start(t, s)
	}
	for _, r := range reps {
		if sn := s.serial(t, r, replicaSite); !serials[sn] {
			t.Fatalf("after the restart replica %s serves serial %s, not the shared one %v", r.name, sn, serials)
		}
	}
	if got := s.pebbleSince(mark); got.accounts != 0 || got.issued != 0 {
		t.Fatalf("restarting the replicas ordered again: %+v", got)
	}

	// Kill the replica that holds issue_cert for the second name as soon as
	// it has it: another replica takes over once the Lease went stale.
	for _, r := range reps {
		waitLogged(r, `"acquiring lock","identifier":"`+replicaSite2+`"`)
	}
	mark = s.pebbleMark()
	holder = handOver(lock2)
	victim := a
	if strings.HasPrefix(holder, "replica-c/") {
		victim = c
	}
	_ = syscall.Kill(-victim.proc.Pid(), syscall.SIGKILL)
	killed := time.Now()
	<-victim.proc.Done()
	survivors := []*replica{b, c}
	if victim == c {
		survivors = []*replica{a, b}
	}
	s.serial(t, survivors[0], replicaSite2)
	t.Logf("%s: holder %s killed mid-order; a survivor serves the certificate %v later (lease_duration 5s)", replicaSite2, holder, time.Since(killed).Round(time.Millisecond))
	serials2 := map[string]bool{}
	for _, r := range survivors {
		serials2[s.serial(t, r, replicaSite2)] = true
	}
	got = s.pebbleSince(mark)
	t.Logf("kill mid-order: %d certificate(s) issued for %s (a 2nd one means the CA had issued before the kill), %d serial(s) served", got.issued, replicaSite2, len(serials2))
	if got.accounts != 0 || got.issued < 1 || got.issued > 2 || len(serials2) != 1 {
		t.Fatalf("after the kill: %+v, serials %v; want no new account, the survivors serving one certificate", got, serials2)
	}

	// Idle: nothing to obtain, nothing to wait for.
	before := sumRequests(t, survivors...)
	const idle = 30 * time.Second
	time.Sleep(idle)
	after := sumRequests(t, survivors...)
	t.Logf("idle: %.1f apiserver requests per replica per minute (%v over %v, 2 replicas)",
		(after["all"]-before["all"])/2/idle.Minutes(), after["all"]-before["all"], idle)
}

// apiserverRequests sums caddy_headless_storage_apiserver_requests_total
// from replica r's /metrics, by verb.
func apiserverRequests(t *testing.T, r *replica) map[string]float64 {
	t.Helper()
	resp, err := http.Get(r.admin + "/metrics")
	if err != nil {
		t.Fatalf("replica %s /metrics: %v", r.name, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	out := map[string]float64{}
	re := regexp.MustCompile(`(?m)^caddy_headless_storage_apiserver_requests_total\{[^}]*verb="(\w+)"[^}]*\} (\S+)$`)
	for _, m := range re.FindAllStringSubmatch(string(b), -1) {
		v, _ := strconv.ParseFloat(m[2], 64)
		out[m[1]] += v
		out["all"] += v
	}
	return out
}

func sumRequests(t *testing.T, reps ...*replica) map[string]float64 {
	total := map[string]float64{}
	for _, r := range reps {
		for k, v := range apiserverRequests(t, r) {
			total[k] += v
		}
	}
	return total
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
