package kubestore_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"time"

	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddy-headless/caddy-headless/kubestore/kubetest"
	"github.com/caddy-headless/caddy-headless/kubestore/storagetest"
)

// The contract, on the in-process fake apiserver; the integration suite
// runs the same on kube-apiserver.
func TestContractOnFakeAPIServer(t *testing.T) {
	f := kubetest.New(t, "caddy")
	storagetest.Run(t, storagetest.Env{Config: func(t *testing.T) kubestore.Config { return f.Config("caddy") }})
}

func TestErrorsNameWhatWasRefused(t *testing.T) {
	f := kubetest.New(t, "caddy")
	cfg := f.Config("other-ns")
	s := mustNew(t, cfg, nil)
	err := s.Store(context.Background(), "k", []byte("v"))
	for _, want := range []string{"403", `"get"`, `"secrets"`, `"other-ns"`, "RBAC"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("Store in a namespace the token may not use: %v; want it to name %s", err, want)
		}
	}
	var ae *kubestore.APIError
	if !errors.As(err, &ae) || ae.Code != 403 || ae.Verb != "get" || ae.Resource != "secrets" || ae.Namespace != "other-ns" {
		t.Fatalf("error %#v is not an APIError for get secrets in other-ns", err)
	}
	if err := s.Ping(context.Background()); err == nil || !strings.Contains(err.Error(), `"list"`) {
		t.Fatalf("Ping: %v, want the refused list named", err)
	}
}

func TestTokenIsReadAgainAfter401(t *testing.T) {
	f := kubetest.New(t, "caddy")
	s := mustNew(t, f.Config("caddy"), nil)
	ctx := context.Background()
	if err := s.Store(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	f.Rotate(t, true) // the kubelet wrote a new token; the old one is refused
	if _, err := s.Load(ctx, "k"); err != nil {
		t.Fatalf("Load after the token rotated: %v (the new token file was not read)", err)
	}
	f.Rotate(t, false) // the server refuses the token the file still has
	_, err := s.Load(ctx, "k")
	if err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "token_file") {
		t.Fatalf("Load with a refused token: %v, want a 401 error naming token_file", err)
	}
}

func TestAPIServerDownFailsWithinTheContext(t *testing.T) {
	f := kubetest.New(t, "caddy")
	s := mustNew(t, f.Config("caddy"), nil)
	f.SetDown(true)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := s.Store(ctx, "k", []byte("v")); err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("Store while the apiserver answers 503: %v", err)
	}
	f.Close() // now nobody answers at all
	if _, err := s.Load(ctx, "k"); err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("Load with no apiserver: %v, want an error saying it did not answer", err)
	}
	if err := s.Lock(ctx, "l"); err == nil {
		t.Fatal("Lock with no apiserver succeeded")
	}
	if ctx.Err() == nil {
		<-ctx.Done()
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	f := kubetest.New(t, "caddy")
	for name, edit := range map[string]func(c *kubestore.Config){
		"prefix":         func(c *kubestore.Config) { c.Prefix = "Caddy_1" },
		"namespace":      func(c *kubestore.Config) { c.Namespace = "" },
		"lease_duration": func(c *kubestore.Config) { c.LeaseDuration = 1500 * time.Millisecond },
		"renew_interval": func(c *kubestore.Config) { c.RenewInterval = c.LeaseDuration },
		"endpoint":       func(c *kubestore.Config) { c.Endpoint = "127.0.0.1:6443" },
		"ca_file":        func(c *kubestore.Config) { c.CAFile = "/nonexistent/ca.crt" },
		"token_file":     func(c *kubestore.Config) { c.TokenFile = "/nonexistent/token" },
	} {
		c := f.Config("caddy")
		edit(&c)
		if _, err := kubestore.New(c, nil); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: New = %v, want an error naming %s", name, err, name)
		}
	}
}

// TestStoreWhenAnotherWriterComesBetween: between Store's read and its
// write another replica changes (409 Conflict) or deletes (404 on PUT, no
// create-on-update) the Secret. Store reads again and its value wins.
func TestStoreWhenAnotherWriterComesBetween(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(obj map[string]any)
	}{
		{"changed", func(obj map[string]any) { obj["data"] = map[string]any{"value": "b3RoZXI="} }},
		{"deleted", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := kubetest.New(t, "caddy")
			s := mustNew(t, f.Config("caddy"), nil)
			ctx := context.Background()
			if err := s.Store(ctx, "k", []byte("first")); err != nil {
				t.Fatal(err)
			}
			name := f.SecretNames("caddy")[0]
			once := true
			f.BeforeRequest(func(verb, resource, obj string) {
				if verb == "update" && once {
					once = false
					f.Mutate("caddy", "secrets", name, tc.mutate)
				}
			})
			if err := s.Store(ctx, "k", []byte("mine")); err != nil {
				t.Fatalf("Store: %v", err)
			}
			if once {
				t.Fatal("the other writer never came between")
			}
			if got, err := s.Load(ctx, "k"); err != nil || string(got) != "mine" {
				t.Fatalf("Load = %q, %v; want the value of the last Store", got, err)
			}
		})
	}
}

// TestLoadChecksTheKeyAnnotation: a Secret under a key's name whose
// annotation names another key (a collision, or someone else's object) is
// never handed out as that key's value.
func TestLoadChecksTheKeyAnnotation(t *testing.T) {
	f := kubetest.New(t, "caddy")
	s := mustNew(t, f.Config("caddy"), nil)
	ctx := context.Background()
	if err := s.Store(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	name := f.SecretNames("caddy")[0]
	f.Mutate("caddy", "secrets", name, func(o map[string]any) {
		o["metadata"].(map[string]any)["annotations"].(map[string]any)["storage.caddy-headless.io/key"] = "other"
	})
	if got, err := s.Load(ctx, "k"); err == nil {
		t.Fatalf("Load of a Secret annotated with another key = %q, nil; want an error", got)
	}
}

// TestValueOverTheLimitFailsBeforeTheAPIServer: a value over 1 MiB is
// refused by the storage itself, naming the key and the limit, without a
// request (the contract test passes on the apiserver's own 422 too; this
// one pins the local check, so the error does not depend on the server's
// wording and no 1.4 MiB body is sent only to be refused).
func TestValueOverTheLimitFailsBeforeTheAPIServer(t *testing.T) {
	f := kubetest.New(t, "caddy")
	s := mustNew(t, f.Config("caddy"), nil)
	before := len(f.Requests())
	err := s.Store(context.Background(), "big", make([]byte, kubestore.MaxValueSize+1))
	if err == nil || !strings.Contains(err.Error(), `"big"`) || !strings.Contains(err.Error(), "at most 1048576") {
		t.Fatalf("Store of 1 MiB + 1: %v, want an error naming the key and the limit", err)
	}
	if reqs := f.Requests()[before:]; len(reqs) != 0 {
		t.Fatalf("Store of a value over the limit sent %q to the apiserver, want no request", reqs)
	}
}

// TestStoreNeverOverwritesWhatItDidNotRead: between Store's read and its
// write the Secret is rewritten by another writer as the Secret of another
// key. The write carries the resourceVersion read, so it is refused (409);
// Store reads again, finds another key's Secret and leaves it alone.
func TestStoreNeverOverwritesWhatItDidNotRead(t *testing.T) {
	f := kubetest.New(t, "caddy")
	s := mustNew(t, f.Config("caddy"), nil)
	ctx := context.Background()
	if err := s.Store(ctx, "k", []byte("first")); err != nil {
		t.Fatal(err)
	}
	name := f.SecretNames("caddy")[0]
	once := true
	f.BeforeRequest(func(verb, resource, obj string) {
		if verb == "update" && once {
			once = false
			f.Mutate("caddy", "secrets", name, func(o map[string]any) {
				o["metadata"].(map[string]any)["annotations"].(map[string]any)["storage.caddy-headless.io/key"] = "other"
				o["data"] = map[string]any{"value": "dGhlaXJz"} // "theirs"
			})
		}
	})
	err := s.Store(ctx, "k", []byte("mine"))
	if once {
		t.Fatal("the other writer never came between")
	}
	owner, data := "", ""
	f.Mutate("caddy", "secrets", name, func(o map[string]any) {
		owner, _ = o["metadata"].(map[string]any)["annotations"].(map[string]any)["storage.caddy-headless.io/key"].(string)
		data, _ = o["data"].(map[string]any)["value"].(string)
	})
	if owner != "other" || data != "dGhlaXJz" {
		t.Fatalf("Store (error %v) overwrote a Secret it had not read: now key %q, data %q", err, owner, data)
	}
	if err == nil {
		t.Fatal("Store reported success, but its value was not written")
	}
}

// stall makes the fake hold requests matching match until release is
// closed (or 10 s pass), longer than the client's RequestTimeout: to the
// client the apiserver stops answering mid-request. It returns how many
// matching requests arrived.
func stall(f *kubetest.API, match func(verb, resource string) bool) (release chan struct{}, count func() int) {
	release = make(chan struct{})
	var mu sync.Mutex
	n := 0
	f.BeforeRequest(func(verb, resource, name string) {
		if !match(verb, resource) {
			return
		}
		mu.Lock()
		n++
		mu.Unlock()
		select {
		case <-release:
		case <-time.After(10 * time.Second):
		}
	})
	return release, func() int { mu.Lock(); defer mu.Unlock(); return n }
}

// TestRequestTimeoutIsBounded: an apiserver that accepts a request and
// never answers fails the call after RequestTimeout, even under a context
// without a deadline.
func TestRequestTimeoutIsBounded(t *testing.T) {
	f := kubetest.New(t, "caddy")
	cfg := f.Config("caddy")
	cfg.RequestTimeout = 200 * time.Millisecond
	s := mustNew(t, cfg, nil)
	release, _ := stall(f, func(verb, resource string) bool { return verb == "get" })
	defer close(release)
	if _, err := s.Load(context.Background(), "k"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Load from an apiserver that does not answer: %v, want the request timeout (DeadlineExceeded)", err)
	}
}

// TestWritesAreNotResentBlindly: a create whose answer never came may have
// been applied; sending it again would answer 409 for our own Lease (the
// lock held by nobody who knows it). The create is sent once and the
// caller gets the error.
func TestWritesAreNotResentBlindly(t *testing.T) {
	f := kubetest.New(t, "caddy")
	cfg := f.Config("caddy")
	cfg.RequestTimeout = 200 * time.Millisecond
	s := mustNew(t, cfg, nil)
	release, creates := stall(f, func(verb, resource string) bool { return verb == "create" })
	defer close(release)
	ok, err := s.TryLock(context.Background(), "l")
	if ok || err == nil {
		t.Fatalf("TryLock whose create was not answered = %v, %v; want an error", ok, err)
	}
	if n := creates(); n != 1 {
		t.Fatalf("the unanswered create was sent %d times, want once", n)
	}
}

// TestLockWaitsThroughAnOutage: certmagic gives up an issuance whose lock it
// cannot get, so a Lock that meets an apiserver answering 503 keeps trying
// and gets the lock once the apiserver is back; a refusal ends it at once.
func TestLockWaitsThroughAnOutage(t *testing.T) {
	f := kubetest.New(t, "caddy")
	s := mustNew(t, f.Config("caddy"), nil)
	f.SetDown(true)
	var mu sync.Mutex
	failed := 0
	f.BeforeRequest(func(verb, resource, name string) {
		mu.Lock()
		defer mu.Unlock()
		if failed++; failed == 3 { // the third request still gets 503
			go f.SetDown(false)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.Lock(ctx, "l"); err != nil {
		t.Fatalf("Lock through a 503 outage: %v, want the lock once the apiserver is back", err)
	}
	defer s.Unlock(context.Background(), "l")
	if h := f.LeaseHolder("caddy", f.LeaseNames("caddy")[0]); !strings.HasPrefix(h, "replica-a/") {
		t.Fatalf("Lease holder %q, want replica-a's", h)
	}

	refused := mustNew(t, f.Config("other-ns"), nil)
	if err := refused.Lock(ctx, "l"); err == nil || !strings.Contains(err.Error(), "403") || ctx.Err() != nil {
		t.Fatalf("Lock refused by RBAC: %v (context %v); want the 403 at once", err, ctx.Err())
	}
}

// TestLockWhoseCreateAnswerWasLost: the apiserver applied the create of the
// Lease but its answer never arrived; the next attempt of the same Lock
// call finds its own identity in the Lease and holds it, instead of waiting
// lease_duration for a holder that is itself.
func TestLockWhoseCreateAnswerWasLost(t *testing.T) {
	f := kubetest.New(t, "caddy")
	cfg := f.Config("caddy")
	cfg.RequestTimeout = 200 * time.Millisecond
	cfg.LeaseDuration, cfg.RenewInterval = time.Hour, time.Minute
	s := mustNew(t, cfg, nil)
	release := make(chan struct{})
	var once sync.Once
	f.BeforeRequest(func(verb, resource, name string) {
		if verb == "create" && resource == "leases" {
			once.Do(func() { <-release }) // answered after the client gave up, then applied
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Lock(ctx, "l") }()
	for len(f.Requests()) < 2 || !strings.HasPrefix(f.Requests()[len(f.Requests())-1], "create leases") {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(cfg.RequestTimeout + 100*time.Millisecond) // the client has given up on the create
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("Lock whose create was applied but not answered: %v, want the lock (it is ours)", err)
	}
	if err := s.Unlock(context.Background(), "l"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if names := f.LeaseNames("caddy"); len(names) != 0 {
		t.Fatalf("Leases left after Unlock: %v", names)
	}
}

// mustNew is kubestore.New for a config the test knows to be good.
func mustNew(t testing.TB, cfg kubestore.Config, logger *zap.Logger) *kubestore.Storage {
	t.Helper()
	s, err := kubestore.New(cfg, logger)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
