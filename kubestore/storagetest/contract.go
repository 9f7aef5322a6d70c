// Package storagetest is the contract of a kubestore.Storage, written once
// and run twice: against the in-process fake apiserver of the unit tests and
// against the real kube-apiserver of the integration suite. Where certmagic's
// FileStorage defines the semantics (List, Stat, Delete of directories), the
// tests compare with it.
package storagetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"reflect"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddyserver/certmagic"
)

// Env opens storages on one apiserver. Config returns a working Config
// (endpoint, CA, token, namespace) with short test intervals; the contract
// sets Prefix and Identity itself.
type Env struct {
	Config func(t *testing.T) kubestore.Config
}

// Run runs every contract test.
func Run(t *testing.T, env Env) {
	t.Run("StoreLoad", env.testStoreLoad)
	t.Run("KeysNeverShareASecret", env.testDistinctKeys)
	t.Run("LikeFileStorage", env.testLikeFileStorage)
	t.Run("Stat", env.testStat)
	t.Run("ValueLimit", env.testValueLimit)
	t.Run("LockMutualExclusion", env.testMutualExclusion)
	t.Run("TryLock", env.testTryLock)
	t.Run("ClockOffsetChangesNothing", env.testClockOffset)
	t.Run("PartitionedHolderLosesLockAndLateUnlockIsHarmless", env.testPartition)
	t.Run("CanceledContext", env.testCanceled)
}

func randomPrefix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return "ct-" + hex.EncodeToString(b)
}

// Fleet opens n storages sharing one fresh prefix (n replicas of one Caddy
// fleet), with identities replica-0…; edit may change each Config.
func (env Env) Fleet(t *testing.T, n int, edit func(i int, c *kubestore.Config)) []*kubestore.Storage {
	t.Helper()
	prefix := randomPrefix()
	var out []*kubestore.Storage
	for i := range n {
		c := env.Config(t)
		c.Prefix = prefix
		c.Identity = fmt.Sprintf("replica-%d", i)
		if edit != nil {
			edit(i, &c)
		}
		s, err := kubestore.New(c, nil)
		if err != nil {
			t.Fatalf("kubestore.New: %v", err)
		}
		if err := s.Ping(context.Background()); err != nil {
			t.Fatalf("Ping: %v", err)
		}
		out = append(out, s)
	}
	return out
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

func (env Env) testStoreLoad(t *testing.T) {
	ss := env.Fleet(t, 2, nil)
	a, b, c := ss[0], ss[1], ctx(t)
	key := "certificates/acme-v02.api.letsencrypt.org-directory/*.example.com/*.example.com.crt"
	if _, err := a.Load(c, key); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing key: %v, want fs.ErrNotExist", err)
	}
	for _, v := range [][]byte{[]byte("first"), []byte("second, longer value"), {}, {0, 1, 2, 255}} {
		if err := a.Store(c, key, v); err != nil {
			t.Fatalf("Store: %v", err)
		}
		// Read-after-write from another replica.
		got, err := b.Load(c, key)
		if err != nil || !bytes.Equal(got, v) {
			t.Fatalf("Load from another replica = %q, %v; want %q", got, err, v)
		}
	}
	if !b.Exists(c, key) || !b.Exists(c, "certificates") || !b.Exists(c, "certificates/acme-v02.api.letsencrypt.org-directory") {
		t.Fatal("Exists is false for a stored key or its directories")
	}
	if b.Exists(c, "certificates/acme") || b.Exists(c, "cert") {
		t.Fatal("Exists is true for a prefix that is not a directory component")
	}
	if err := b.Delete(c, key); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := a.Load(c, key); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load after Delete: %v, want fs.ErrNotExist", err)
	}
	if err := a.Delete(c, key); err != nil {
		t.Fatalf("Delete of a deleted key: %v, want nil", err)
	}
	if a.Exists(c, "certificates") {
		t.Fatal("the directory still exists after its only key was deleted")
	}
}

// Keys that a lossy mapping would merge: each must keep its own value.
var confusable = []string{
	"a/b", "a.b", "a-b", "a_b", "A/b", "a/B", "a/b/c", "a/b.c", "a/bc",
	"*.example.com", "wildcard.example.com", "wildcard_.example.com", "-a", "a", "a-", "é", "e",
	strings.Repeat("x", 300), strings.Repeat("x", 301),
}

func (env Env) testDistinctKeys(t *testing.T) {
	s, c := env.Fleet(t, 1, nil)[0], ctx(t)
	keys := map[string]bool{}
	for _, k := range confusable {
		keys[k] = true
	}
	for k := range keys {
		if err := s.Store(c, k, []byte("value of "+k)); err != nil {
			t.Fatalf("Store(%q): %v", k, err)
		}
	}
	for k := range keys {
		got, err := s.Load(c, k)
		if err != nil || string(got) != "value of "+k {
			t.Fatalf("Load(%q) = %q, %v: two keys share a Secret", k, got, err)
		}
	}
	all, err := s.List(c, "", true)
	if err != nil {
		t.Fatal(err)
	}
	files := 0
	for _, k := range all {
		if keys[k] {
			files++
		}
	}
	if files != len(keys) {
		t.Fatalf("List found %d of the %d keys: %q", files, len(keys), all)
	}
}

// testLikeFileStorage runs the same operations on certmagic's FileStorage
// and on the Kubernetes storage and compares every answer.
func (env Env) testLikeFileStorage(t *testing.T) {
	s, c := env.Fleet(t, 1, nil)[0], ctx(t)
	fsys := &certmagic.FileStorage{Path: t.TempDir()}
	keys := []string{
		"acme/ca.example/users/me@example.com/me.json",
		"acme/ca.example/users/me@example.com/me.key",
		"acme/ca.example/users/other/other.json",
		"certificates/ca.example/a.example.com/a.example.com.crt",
		"certificates/ca.example/a.example.com/a.example.com.key",
		"certificates/ca.example/b.example.com/b.example.com.crt",
		"ocsp/a.example.com-123",
		"last_clean.json",
	}
	for _, k := range keys {
		for _, st := range []certmagic.Storage{fsys, s} {
			if err := st.Store(c, k, []byte(k)); err != nil {
				t.Fatalf("Store(%q): %v", k, err)
			}
		}
	}
	compare := func(when string) {
		t.Helper()
		for _, dir := range []string{"", "acme", "acme/ca.example/users", "certificates", "certificates/ca.example", "certificates/ca.example/a.example.com", "nothing", "acme/ca", "last_clean.json"} {
			for _, rec := range []bool{false, true} {
				want, werr := fsys.List(c, dir, rec)
				got, gerr := s.List(c, dir, rec)
				sort.Strings(want)
				sort.Strings(got)
				if errors.Is(werr, fs.ErrNotExist) != errors.Is(gerr, fs.ErrNotExist) || (werr == nil) != (gerr == nil) {
					t.Fatalf("%s: List(%q, %v) error %v, FileStorage %v", when, dir, rec, gerr, werr)
				}
				if len(want) == 0 && len(got) == 0 {
					continue
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("%s: List(%q, %v) =\n%q\nFileStorage:\n%q", when, dir, rec, got, want)
				}
			}
			if dir == "" {
				continue
			}
			if got, want := s.Exists(c, dir), fsys.Exists(c, dir); got != want {
				t.Fatalf("%s: Exists(%q) = %v, FileStorage %v", when, dir, got, want)
			}
			gi, gerr := s.Stat(c, dir)
			wi, werr := fsys.Stat(c, dir)
			if errors.Is(gerr, fs.ErrNotExist) != errors.Is(werr, fs.ErrNotExist) || (gerr == nil && gi.IsTerminal != wi.IsTerminal) {
				t.Fatalf("%s: Stat(%q) = %+v, %v; FileStorage %+v, %v", when, dir, gi, gerr, wi, werr)
			}
		}
	}
	compare("after storing")
	for _, del := range []string{"certificates/ca.example/a.example.com", "acme/ca.example/users/me@example.com/me.key", "nothing/at/all", "acme"} {
		for _, st := range []certmagic.Storage{fsys, s} {
			if err := st.Delete(c, del); err != nil {
				t.Fatalf("Delete(%q): %v", del, err)
			}
		}
		compare("after deleting " + del)
	}
}

func (env Env) testStat(t *testing.T) {
	s, c := env.Fleet(t, 1, nil)[0], ctx(t)
	before := time.Now().Add(-time.Second)
	if err := s.Store(c, "d/k", []byte("12345")); err != nil {
		t.Fatal(err)
	}
	info, err := s.Stat(c, "d/k")
	if err != nil {
		t.Fatal(err)
	}
	if info.Key != "d/k" || info.Size != 5 || !info.IsTerminal || info.Modified.Before(before) || info.Modified.After(time.Now().Add(time.Second)) {
		t.Fatalf("Stat = %+v, want key d/k, size 5, terminal, modified now", info)
	}
	time.Sleep(20 * time.Millisecond) // so that a second store is visibly later
	if err := s.Store(c, "d/k", []byte("1")); err != nil {
		t.Fatal(err)
	}
	again, err := s.Stat(c, "d/k")
	if err != nil || !again.Modified.After(info.Modified) || again.Size != 1 {
		t.Fatalf("Stat after a second Store = %+v, %v; want a later Modified than %v and size 1", again, err, info.Modified)
	}
	if _, err := s.Stat(c, "d/missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat of a missing key: %v, want fs.ErrNotExist", err)
	}
}

func (env Env) testValueLimit(t *testing.T) {
	s, c := env.Fleet(t, 1, nil)[0], ctx(t)
	full := bytes.Repeat([]byte{0xa5}, kubestore.MaxValueSize)
	if err := s.Store(c, "big", full); err != nil {
		t.Fatalf("Store of exactly 1 MiB: %v", err)
	}
	if got, err := s.Load(c, "big"); err != nil || !bytes.Equal(got, full) {
		t.Fatalf("Load of 1 MiB: %d bytes, %v", len(got), err)
	}
	err := s.Store(c, "bigger", append(full, 0))
	if err == nil || !strings.Contains(err.Error(), "at most 1048576") || !strings.Contains(err.Error(), `"bigger"`) {
		t.Fatalf("Store of 1 MiB + 1: %v, want an error naming the key and the limit", err)
	}
}

// testMutualExclusion: 20 goroutines across 3 replicas take one lock 3
// times each; a counter proves no two held it at once, and everyone got it.
func (env Env) testMutualExclusion(t *testing.T) {
	ss := env.Fleet(t, 3, nil)
	c := ctx(t)
	const goroutines, rounds = 20, 3
	var inside, maxInside, total atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*rounds)
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := ss[g%len(ss)]
			for range rounds {
				if err := s.Lock(c, "issue_cert_*.example.com"); err != nil {
					errs <- err
					return
				}
				n := inside.Add(1)
				for {
					m := maxInside.Load()
					if n <= m || maxInside.CompareAndSwap(m, n) {
						break
					}
				}
				time.Sleep(time.Millisecond)
				inside.Add(-1)
				total.Add(1)
				if err := s.Unlock(c, "issue_cert_*.example.com"); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if maxInside.Load() != 1 || total.Load() != goroutines*rounds {
		t.Fatalf("at most %d holders at once (want 1), %d of %d critical sections ran", maxInside.Load(), total.Load(), goroutines*rounds)
	}
}

func (env Env) testTryLock(t *testing.T) {
	ss := env.Fleet(t, 2, nil)
	a, b, c := ss[0], ss[1], ctx(t)
	if ok, err := a.TryLock(c, "l"); !ok || err != nil {
		t.Fatalf("TryLock of a free lock = %v, %v", ok, err)
	}
	for _, s := range []*kubestore.Storage{a, b} { // a second TryLock in the same process also fails
		if ok, err := s.TryLock(c, "l"); ok || err != nil {
			t.Fatalf("TryLock of a held lock = %v, %v; want false, nil", ok, err)
		}
	}
	if err := a.Unlock(c, "l"); err != nil {
		t.Fatal(err)
	}
	if err := a.Unlock(c, "l"); err == nil {
		t.Fatal("Unlock of a lock not held: nil error")
	}
	if ok, err := b.TryLock(c, "l"); !ok || err != nil {
		t.Fatalf("TryLock after Unlock = %v, %v", ok, err)
	}
	if err := b.Unlock(c, "l"); err != nil {
		t.Fatal(err)
	}
}

// testClockOffset: the holder's clock runs an hour behind, another's an
// hour ahead. The Lease's times look ancient or from the future; a lock
// judged by them would be taken from a live holder at once.
func (env Env) testClockOffset(t *testing.T) {
	ss := env.Fleet(t, 2, func(i int, c *kubestore.Config) {
		off := time.Hour
		if i == 0 {
			off = -time.Hour
		}
		c.Now = func() time.Time { return time.Now().Add(off) }
	})
	a, b, c := ss[0], ss[1], ctx(t)
	if err := a.Lock(c, "skewed"); err != nil {
		t.Fatal(err)
	}
	lease := env.Config(t).LeaseDuration
	deadline := time.Now().Add(lease*3/2 + 500*time.Millisecond)
	for time.Now().Before(deadline) {
		if ok, err := b.TryLock(c, "skewed"); ok || err != nil {
			t.Fatalf("a replica an hour ahead took a live holder's lock (TryLock = %v, %v)", ok, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := a.Unlock(c, "skewed"); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(c, "skewed"); !ok || err != nil {
		t.Fatalf("TryLock after Unlock = %v, %v", ok, err)
	}
	if err := b.Unlock(c, "skewed"); err != nil {
		t.Fatal(err)
	}
}

// testPartition: the holder loses its way to the apiserver (a proxy cut).
// Another replica takes the lock over after lease_duration; when the old
// holder comes back its heartbeat finds the new holder, and its late
// Unlock reports the loss and leaves the new holder's Lease alone.
func (env Env) testPartition(t *testing.T) {
	base := env.Config(t)
	proxy := newProxy(t, base.Endpoint)
	ss := env.Fleet(t, 3, func(i int, c *kubestore.Config) {
		if i == 0 {
			c.Endpoint = proxy.url
			c.RequestTimeout = time.Second
		}
	})
	a, b, third, c := ss[0], ss[1], ss[2], ctx(t)
	if err := a.Lock(c, "issue_cert_p.example.com"); err != nil {
		t.Fatal(err)
	}
	proxy.cut(true)
	start := time.Now()
	if err := b.Lock(c, "issue_cert_p.example.com"); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if took < base.LeaseDuration {
		t.Fatalf("the lock was taken over after %v, before lease_duration %v", took, base.LeaseDuration)
	}
	t.Logf("takeover %v after the holder was cut off (lease_duration %v, poll %v)", took.Round(time.Millisecond), base.LeaseDuration, base.PollInterval)
	proxy.cut(false)
	err := a.Unlock(c, "issue_cert_p.example.com")
	if !errors.Is(err, kubestore.ErrLockLost) {
		t.Fatalf("late Unlock of the old holder: %v, want ErrLockLost", err)
	}
	if ok, err := third.TryLock(c, "issue_cert_p.example.com"); ok || err != nil {
		t.Fatalf("after the old holder's late Unlock a third replica could take the lock (%v, %v): the new holder's Lease was freed", ok, err)
	}
	if err := b.Unlock(c, "issue_cert_p.example.com"); err != nil {
		t.Fatalf("the new holder's Unlock: %v", err)
	}
}

func (env Env) testCanceled(t *testing.T) {
	ss := env.Fleet(t, 2, nil)
	a, b := ss[0], ss[1]
	c := ctx(t)
	if err := a.Lock(c, "busy"); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(c, 200*time.Millisecond)
	defer cancel()
	if err := b.Lock(short, "busy"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock with an expiring context: %v, want DeadlineExceeded", err)
	}
	dead, cancel2 := context.WithCancel(c)
	cancel2()
	if err := b.Store(dead, "k", []byte("v")); !errors.Is(err, context.Canceled) {
		t.Fatalf("Store with a canceled context: %v, want context.Canceled", err)
	}
	if err := a.Unlock(c, "busy"); err != nil {
		t.Fatal(err)
	}
}

// proxy forwards TCP to the apiserver until cut: then it drops every
// connection and refuses new ones (accepts and closes them).
type proxy struct {
	url string
	ln  net.Listener

	mu    sync.Mutex
	down  bool
	conns map[net.Conn]bool
}

func newProxy(t *testing.T, endpoint string) *proxy {
	t.Helper()
	u, err := url.Parse(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, conns: map[net.Conn]bool{}, url: u.Scheme + "://" + ln.Addr().String()}
	t.Cleanup(func() { ln.Close(); p.cut(true) })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			down := p.down
			p.mu.Unlock()
			if down {
				in.Close()
				continue
			}
			out, err := net.Dial("tcp", u.Host)
			if err != nil {
				in.Close()
				continue
			}
			p.track(in, out)
			go func() { io.Copy(out, in); out.Close() }()
			go func() { io.Copy(in, out); in.Close() }()
		}
	}()
	return p
}

func (p *proxy) track(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		p.conns[c] = true
	}
}

func (p *proxy) cut(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	if down {
		for c := range p.conns {
			c.Close()
		}
		p.conns = map[net.Conn]bool{}
	}
}
