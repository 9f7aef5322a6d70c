package kubestore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/caddymodule/kubestore"
	"github.com/caddy-headless/caddy-headless/caddymodule/kubestore/kubetest"
)

// TestLostLockIsLoggedAndNotFreed: another replica takes the Lease while we
// hold it. The heartbeat finds out, logs an error naming the lock and the
// new holder, and Unlock reports the loss and leaves the Lease alone.
func TestLostLockIsLoggedAndNotFreed(t *testing.T) {
	api := kubetest.New(t, "caddy")
	core, logs := observer.New(zap.InfoLevel)
	s, err := kubestore.New(api.Config("caddy"), zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const lock = "issue_cert_lost.example.com"
	if err := s.Lock(ctx, lock); err != nil {
		t.Fatal(err)
	}
	leases := api.LeaseNames("caddy")
	if len(leases) != 1 {
		t.Fatalf("Leases after one Lock: %q", leases)
	}
	lease := leases[0]
	if !api.SetLeaseHolder("caddy", lease, "intruder/1") {
		t.Fatal("no Lease for the held lock")
	}
	deadline := time.Now().Add(10 * time.Second)
	for logs.FilterMessageSnippet("lock lost").Len() == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	lost := logs.FilterMessageSnippet("lock lost").All()
	if len(lost) != 1 || lost[0].Level != zap.ErrorLevel {
		t.Fatalf("want one error \"lock lost\", got %v", logs.All())
	}
	fields := lost[0].ContextMap()
	if fields["lock"] != lock || fields["new_holder"] != "intruder/1" {
		t.Fatalf("the error does not name the lock and the new holder: %v", fields)
	}
	if err := s.Unlock(ctx, lock); !errors.Is(err, kubestore.ErrLockLost) {
		t.Fatalf("Unlock of a lost lock: %v, want ErrLockLost", err)
	}
	if h := api.LeaseHolder("caddy", lease); h != "intruder/1" {
		t.Fatalf("after the late Unlock the Lease holder is %q, want the new holder's to be left alone", h)
	}
}
