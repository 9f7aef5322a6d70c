package kubestore_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/internal/clock/clocktest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddy-headless/caddy-headless/kubestore/kubetest"
)

// provisionCA makes the storage calls Caddy v2.11.9's caddypki makes when
// it provisions authority id (modules/caddypki/ca.go: loadOrGenRoot, then
// loadOrGenIntermediate), in the same order with the same error handling:
// a certificate that is missing is generated and stored certificate first,
// key second; a certificate that is found has its key loaded at once. It
// returns the root this replica would serve, after checking that each key
// it holds belongs to its certificate.
func provisionCA(ctx context.Context, st certmagic.Storage, id string) (*x509.Certificate, error) {
	dir := "pki/authorities/" + id + "/"
	loadOrGen := func(name string, parent *x509.Certificate, parentKey crypto.Signer) (*x509.Certificate, crypto.Signer, error) {
		certPEM, err := st.Load(ctx, dir+name+".crt")
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				return nil, nil, fmt.Errorf("loading %s cert: %v", name, err)
			}
			c, k := generate(name, parent, parentKey)
			if err := st.Store(ctx, dir+name+".crt", pemCert(c)); err != nil {
				return nil, nil, fmt.Errorf("saving %s certificate: %v", name, err)
			}
			kp, _ := certmagic.PEMEncodePrivateKey(k)
			if err := st.Store(ctx, dir+name+".key", kp); err != nil {
				return nil, nil, fmt.Errorf("saving %s key: %v", name, err)
			}
			return c, k, nil
		}
		c := parseCert(certPEM)
		keyPEM, err := st.Load(ctx, dir+name+".key")
		if err != nil {
			return nil, nil, fmt.Errorf("loading %s key: %v", name, err)
		}
		k, err := certmagic.PEMDecodePrivateKey(keyPEM)
		if err != nil {
			return nil, nil, fmt.Errorf("decoding %s key: %v", name, err)
		}
		if !k.Public().(*ecdsa.PublicKey).Equal(c.PublicKey) {
			return nil, nil, fmt.Errorf("the %s key loaded does not belong to the %s certificate loaded", name, name)
		}
		return c, k, nil
	}
	root, rootKey, err := loadOrGen("root", nil, nil)
	if err != nil {
		return nil, err
	}
	inter, _, err := loadOrGen("intermediate", root, rootKey)
	if err != nil {
		return nil, err
	}
	if err := inter.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("the intermediate is not signed by the root: %v", err)
	}
	return root, nil
}

func generate(name string, parent *x509.Certificate, parentKey crypto.Signer) (*x509.Certificate, crypto.Signer) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "test " + name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	if parent == nil {
		parent, parentKey = tmpl, k
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &k.PublicKey, parentKey)
	if err != nil {
		panic(err)
	}
	return parseCert(pemCert0(der)), k
}

func pemCert0(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func pemCert(c *x509.Certificate) []byte { return pemCert0(c.Raw) }

func parseCert(p []byte) *x509.Certificate {
	b, _ := pem.Decode(p)
	if b == nil {
		return nil
	}
	c, _ := x509.ParseCertificate(b.Bytes)
	return c
}

// replicas makes n storages with identities replica-0… on api, with prefix.
func replicas(t *testing.T, api *kubetest.API, prefix string, n int, logger *zap.Logger) []*kubestore.Storage {
	t.Helper()
	var out []*kubestore.Storage
	for i := range n {
		c := api.Config("caddy")
		c.Prefix, c.Identity = prefix, fmt.Sprintf("replica-%d", i)
		out = append(out, mustNew(t, c, logger))
	}
	return out
}

// startTogether runs provisionCA on every storage at the same moment and
// returns each one's root (nil where it failed) and errors.
func startTogether(sts []*kubestore.Storage) ([]*x509.Certificate, []error) {
	roots := make([]*x509.Certificate, len(sts))
	errs := make([]error, len(sts))
	var wg sync.WaitGroup
	gate := make(chan struct{})
	for i, st := range sts {
		wg.Go(func() {
			<-gate
			roots[i], errs[i] = provisionCA(context.Background(), st, "local")
		})
	}
	close(gate)
	wg.Wait()
	return roots, errs
}

// slowWrites makes every Secret write on api take a little while, as on a
// busy apiserver: the window between a certificate and its key widens.
func slowWrites(api *kubetest.API) {
	api.BeforeRequest(func(verb, resource, _ string) {
		if resource == "secrets" && (verb == "create" || verb == "update") {
			time.Sleep(5 * time.Millisecond)
		}
	})
}

// TestCAIsCreatedOnceByReplicasStartingTogether: five replicas provision
// Caddy's local CA on fresh storage at the same moment, 10 rounds. Every
// start succeeds and all five hold the root stored, whose key matches.
func TestCAIsCreatedOnceByReplicasStartingTogether(t *testing.T) {
	api := kubetest.New(t, "caddy")
	slowWrites(api)
	failed, split := 0, 0
	for round := range 10 {
		sts := replicas(t, api, fmt.Sprintf("round-%d", round), 5, nil)
		roots, errs := startTogether(sts)
		distinct := map[string]bool{}
		for i, err := range errs {
			if err != nil {
				failed++
				t.Errorf("round %d: replica %d failed to start: %v", round, i, err)
				continue
			}
			distinct[string(roots[i].Raw)] = true
		}
		if len(distinct) > 1 {
			split++
			t.Errorf("round %d: the replicas hold %d different roots", round, len(distinct))
		}
		// A later start agrees with all of them (the storage holds their root).
		later, err := provisionCA(context.Background(), replicas(t, api, fmt.Sprintf("round-%d", round), 1, nil)[0], "local")
		if err != nil {
			t.Fatalf("round %d: a later start: %v", round, err)
		}
		if len(distinct) == 1 && !distinct[string(later.Raw)] {
			t.Errorf("round %d: the stored root is not the one the replicas hold", round)
		}
		if n := len(api.LeaseNames("caddy")); n != 0 {
			t.Errorf("round %d: %d Leases left after every replica started", round, n)
		}
	}
	t.Logf("10 rounds of 5 replicas: %d failed starts, %d rounds with different roots", failed, split)
}

// TestCAStartWithAllKeysPresentTouchesNoLease: once the pairs exist, a start
// reads Secrets only: four GETs, as without this rule (the key read with
// the certificate answers caddypki's Load of the key), no Lease request.
func TestCAStartWithAllKeysPresentTouchesNoLease(t *testing.T) {
	api := kubetest.New(t, "caddy")
	st := replicas(t, api, "caddy", 1, nil)[0]
	if _, err := provisionCA(context.Background(), st, "local"); err != nil {
		t.Fatal(err)
	}
	before := len(api.Requests())
	if _, err := provisionCA(context.Background(), st, "local"); err != nil {
		t.Fatal(err)
	}
	reqs := api.Requests()[before:]
	gets := 0
	for _, r := range reqs {
		if strings.Contains(r, "leases") {
			t.Errorf("a start with the CA complete sent %q", r)
		}
		if strings.HasPrefix(r, "get secrets ") {
			gets++
		}
	}
	if gets != 4 || len(reqs) != 4 {
		t.Fatalf("a start with the CA complete sent %d requests (%d Secret GETs), want 4 GETs: %q", len(reqs), gets, reqs)
	}
}

// TestCAWriterKilledHoldingTheLock: a replica found the root missing, took
// the pair's lock, stored the root certificate and died before its key.
// Another replica waits until the Lease has gone unrenewed for
// lease_duration, takes it over, finds a certificate without its key and
// generates the pair again: it starts, with a root whose key is stored.
func TestCAWriterKilledHoldingTheLock(t *testing.T) {
	api := kubetest.New(t, "caddy")
	core, logs := observer.New(zap.InfoLevel)
	dead := replicas(t, api, "caddy", 1, zap.New(core))[0]
	clk := clocktest.NewFake()
	c0 := api.Config("caddy")
	c0.Identity, c0.Clock = "replica-1", clk
	survivor := mustNew(t, c0, zap.New(core))
	ctx := context.Background()
	if _, err := dead.Load(ctx, "pki/authorities/local/root.crt"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("first Load of the root on fresh storage: %v, want does not exist", err)
	}
	c, _ := generate("root", nil, nil)
	if err := dead.Store(ctx, "pki/authorities/local/root.crt", pemCert(c)); err != nil {
		t.Fatal(err)
	}
	leases := api.LeaseNames("caddy")
	if len(leases) != 1 {
		t.Fatalf("Leases while the root is being written: %q, want the pair's lock", leases)
	}
	// The writer dies: nobody renews its Lease from here on (its heartbeat
	// finds the Lease no longer names it and stops).
	api.Mutate("caddy", "leases", leases[0], func(o map[string]any) { o["spec"].(map[string]any)["holderIdentity"] = "dead/1" })
	type started struct {
		root *x509.Certificate
		err  error
	}
	done := make(chan started, 1)
	go func() {
		root, err := provisionCA(ctx, survivor, "local")
		done <- started{root, err}
	}()
	// The survivor polls on its clock until it has watched the Lease
	// unchanged for lease_duration.
	var waited time.Duration
	for api.LeaseHolder("caddy", leases[0]) == "dead/1" {
		poll.Until(t, "the survivor on its poll timer", func() bool { return clk.Armed() >= 1 || len(done) > 0 })
		if len(done) > 0 || api.LeaseHolder("caddy", leases[0]) != "dead/1" {
			break
		}
		if waited > c0.LeaseDuration+c0.PollInterval {
			t.Fatalf("the survivor watched the dead writer's Lease unchanged for %v on its clock and did not take it over (lease_duration %v)", waited, c0.LeaseDuration)
		}
		clk.Advance(c0.PollInterval)
		waited += c0.PollInterval
	}
	res := <-done
	root, err := res.root, res.err
	if err != nil {
		t.Fatalf("the survivor failed to start: %v", err)
	}
	if waited < c0.LeaseDuration {
		t.Fatalf("the survivor took the dead writer's Lease over after %v on its clock, before lease_duration (%v)", waited, c0.LeaseDuration)
	}
	if root.Equal(c) {
		t.Fatal("the survivor uses the dead writer's root, whose key was never stored")
	}
	if logs.FilterMessageSnippet("lock taken over from a stale holder").Len() != 1 ||
		logs.FilterMessageSnippet("CA certificate without its key").Len() != 1 {
		t.Fatalf("want the takeover and the regeneration logged, got %v", logs.All())
	}
	if later, err := provisionCA(ctx, replicas(t, api, "caddy", 1, nil)[0], "local"); err != nil || !later.Equal(root) {
		t.Fatalf("a later start: %v; same root: %v", err, err == nil && later.Equal(root))
	}
}

// TestCAWriterThatGivesUpReleasesTheLock: a live replica found the root
// missing and never stores the key (its config failed). Cleaning its config
// up releases the pair's lock at once; without that, CAWriteTimeout does.
func TestCAWriterThatGivesUpReleasesTheLock(t *testing.T) {
	for _, how := range []string{"cleanup", "timeout"} {
		t.Run(how, func(t *testing.T) {
			api := kubetest.New(t, "caddy")
			var sts []*kubestore.Storage
			for i := range 2 {
				c := api.Config("caddy")
				c.Identity = fmt.Sprintf("replica-%d", i)
				c.LeaseDuration, c.RenewInterval = time.Hour, time.Second // only a release frees it
				if how == "timeout" {
					c.CAWriteTimeout = 200 * time.Millisecond
				}
				sts = append(sts, mustNew(t, c, nil))
			}
			ctx := context.Background()
			if _, err := sts[0].Load(ctx, "pki/authorities/local/root.crt"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("first Load of the root on fresh storage: %v", err)
			}
			if how == "cleanup" {
				sts[0].ReleaseCAWrites()
			}
			if _, err := provisionCA(ctx, sts[1], "local"); err != nil {
				t.Fatalf("the other replica after the writer gave up: %v", err)
			}
		})
	}
}

// TestCAPairWritersTakeTurns: caddypki renews the intermediate on every
// replica by storing certificate, then key, with no Load before. Replica A
// has stored its certificate when replica B stores its pair; A's key comes
// last. Writers of one pair take turns (B waits for A's key), so the
// stored pair is one writer's, never B's certificate with A's key.
func TestCAPairWritersTakeTurns(t *testing.T) {
	api := kubetest.New(t, "caddy")
	sts := replicas(t, api, "caddy", 2, nil)
	a, b := sts[0], sts[1]
	ctx := context.Background()
	root, rootKey := generate("root", nil, nil)
	pair := func() ([]byte, []byte) {
		c, k := generate("intermediate", root, rootKey)
		kp, _ := certmagic.PEMEncodePrivateKey(k)
		return pemCert(c), kp
	}
	certA, keyA := pair()
	certB, keyB := pair()
	if err := a.Store(ctx, "pki/authorities/local/intermediate.crt", certA); err != nil {
		t.Fatal(err)
	}
	waiting := make(chan struct{}, 1)
	api.BeforeRequest(func(verb, resource, _ string) {
		if resource == "leases" && verb == "get" {
			select {
			case waiting <- struct{}{}:
			default:
			}
		}
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := b.Store(ctx, "pki/authorities/local/intermediate.crt", certB); err != nil {
			t.Error(err)
		}
		if err := b.Store(ctx, "pki/authorities/local/intermediate.key", keyB); err != nil {
			t.Error(err)
		}
	}()
	select {
	case <-done: // B did not wait for A
	case <-waiting: // B waits for the pair's lock
	}
	if err := a.Store(ctx, "pki/authorities/local/intermediate.key", keyA); err != nil {
		t.Fatal(err)
	}
	<-done
	// Load hands out only a complete pair: the certificate with its key.
	c, err := a.Load(ctx, "pki/authorities/local/intermediate.crt")
	if err != nil {
		t.Fatalf("the stored intermediate is not a complete pair (two writers' halves): %v", err)
	}
	kp, _ := a.Load(ctx, "pki/authorities/local/intermediate.key")
	k, err := certmagic.PEMDecodePrivateKey(kp)
	if err != nil {
		t.Fatal(err)
	}
	if !k.Public().(*ecdsa.PublicKey).Equal(parseCert(c).PublicKey) {
		t.Fatal("the stored intermediate key is not the stored certificate's: two writers' halves")
	}
}

// TestCAPairWithAnotherKeyIsRegenerated: the stored key does not belong to
// the stored certificate (a writer died between a renewal's two writes).
// Loading the certificate treats the pair as incomplete: it is generated
// again instead of handing caddypki a key that cannot sign for it.
func TestCAPairWithAnotherKeyIsRegenerated(t *testing.T) {
	api := kubetest.New(t, "caddy")
	st := replicas(t, api, "caddy", 1, nil)[0]
	ctx := context.Background()
	c, _ := generate("root", nil, nil)
	_, other := generate("root", nil, nil)
	kp, _ := certmagic.PEMEncodePrivateKey(other)
	if err := st.Store(ctx, "pki/authorities/local/root.crt", pemCert(c)); err != nil {
		t.Fatal(err)
	}
	if err := st.Store(ctx, "pki/authorities/local/root.key", kp); err != nil {
		t.Fatal(err)
	}
	root, err := provisionCA(ctx, st, "local")
	if err != nil {
		t.Fatalf("start on a mismatched root pair: %v", err)
	}
	if root.Equal(c) {
		t.Fatal("the root whose key is not stored is still in use")
	}
}

// TestCAWaitForALiveWriterIsBounded: the pair's lock is held by a live
// replica that renews it and never writes (stuck). A replica loading the
// certificate does not wait forever: it fails, naming the lock and its
// holder, once CAWriteTimeout plus lease_duration have passed on its clock,
// not before.
func TestCAWaitForALiveWriterIsBounded(t *testing.T) {
	api := kubetest.New(t, "caddy")
	clk := clocktest.NewFake()
	c := api.Config("caddy")
	c.Identity, c.Clock = "replica-0", clk
	holder := mustNew(t, c, nil)
	c.Identity, c.CAWriteTimeout = "waiter", 100*time.Millisecond
	waiter := mustNew(t, c, nil)
	bound := c.CAWriteTimeout + c.LeaseDuration
	ctx := context.Background()
	if err := holder.Lock(ctx, "pki_local_root"); err != nil {
		t.Fatal(err)
	}
	defer holder.Unlock(ctx, "pki_local_root")
	clk.WaitArmed(t, 1) // the heartbeat
	done := make(chan error, 1)
	go func() {
		_, err := waiter.Load(ctx, "pki/authorities/local/root.crt")
		done <- err
	}()
	var waited time.Duration
	for {
		// The heartbeat has renewed and the waiter is back on its poll
		// timer, or the waiter has given up.
		poll.Until(t, "the heartbeat and the waiting Load on their timers", func() bool { return clk.Armed() >= 2 || len(done) > 0 })
		if len(done) > 0 {
			break
		}
		if waited > bound+c.PollInterval {
			t.Fatalf("Load still waits for the pair after %v on its clock; want it to give up after %v", waited, bound)
		}
		clk.Advance(c.PollInterval)
		waited += c.PollInterval
	}
	err := <-done
	if waited < bound {
		t.Fatalf("Load gave up waiting for the pair after %v on its clock, before CAWriteTimeout plus lease_duration (%v): %v", waited, bound, err)
	}
	if err == nil || errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "pki_local_root") || !strings.Contains(err.Error(), "replica-0/") {
		t.Fatalf("Load while a live replica holds the pair's lock and never writes: %v; want an error naming the lock and replica-0", err)
	}
	t.Logf("the error: %v", err)
}

// TestCAKeyIsTheOneReadWithTheCertificate: replica B starts while A renews
// the intermediate: B's caddypki has loaded the certificate when A stores
// a new pair, and loads the key after. B gets the key that belongs to the
// certificate it holds, not the renewed one.
func TestCAKeyIsTheOneReadWithTheCertificate(t *testing.T) {
	api := kubetest.New(t, "caddy")
	sts := replicas(t, api, "caddy", 2, nil)
	a, b := sts[0], sts[1]
	ctx := context.Background()
	root, err := provisionCA(ctx, a, "local")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := b.Load(ctx, "pki/authorities/local/intermediate.crt")
	if err != nil {
		t.Fatal(err)
	}
	// A renews: a new intermediate, certificate then key.
	rootKeyPEM := mustLoad(t, a, "pki/authorities/local/root.key")
	rootKey, _ := certmagic.PEMDecodePrivateKey(rootKeyPEM)
	c2, k2 := generate("intermediate", root, rootKey)
	kp2, _ := certmagic.PEMEncodePrivateKey(k2)
	if err := a.Store(ctx, "pki/authorities/local/intermediate.crt", pemCert(c2)); err != nil {
		t.Fatal(err)
	}
	if err := a.Store(ctx, "pki/authorities/local/intermediate.key", kp2); err != nil {
		t.Fatal(err)
	}
	keyPEM, err := b.Load(ctx, "pki/authorities/local/intermediate.key")
	if err != nil {
		t.Fatal(err)
	}
	k, err := certmagic.PEMDecodePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if !k.Public().(*ecdsa.PublicKey).Equal(parseCert(certPEM).PublicKey) {
		t.Fatal("B holds the old intermediate certificate with the renewed key")
	}
	// Only once: a later Load of the key reads the stored (renewed) one.
	if again := mustLoad(t, b, "pki/authorities/local/intermediate.key"); string(again) != string(kp2) {
		t.Fatal("a second Load of the key did not read the stored key")
	}
}

func mustLoad(t *testing.T, st *kubestore.Storage, key string) []byte {
	t.Helper()
	v, err := st.Load(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
