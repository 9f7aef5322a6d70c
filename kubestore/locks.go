package kubestore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Locks are Leases (coordination.k8s.io/v1), one per certmagic lock name.
//
// certmagic holds "issue_cert_<name>" for the whole ACME retry loop, which
// can last days, so a held lock is renewed by a heartbeat for as long as it
// is held, whatever happens to the context of the Lock call, and across
// Caddy config reloads (which provision a new Storage): held locks live in
// a process-wide table.
//
// Whether a holder is gone is judged the way client-go's leaderelection
// does it: by when *this* process last saw the Lease change (on its own
// clock, Config.Clock, monotonic by default), never by comparing the
// holder's timestamps with our clock. Every write carries the
// resourceVersion it read, so of two replicas taking over the same stale
// Lease one gets 409 Conflict, and Unlock deletes with uid and
// resourceVersion preconditions, so a holder that lost its lock never frees
// the new holder's.

// heldLock is a lock this process holds.
type heldLock struct {
	store    *Storage
	name     string // certmagic's lock name
	object   string // Lease name
	identity string // holder identity of this Lock call

	mu    sync.Mutex
	lease *lease // as last written or read by us
	lost  string // the holder that took it, once lost

	stop chan struct{}
	done chan struct{}
}

// held is the process-wide table of held locks, keyed by apiserver,
// namespace, identity and Lease name. It outlives Storage values on purpose.
// A second Lock of the same identity finds the lock here and waits for it;
// two identities in one process (tests) are two replicas.
var held = struct {
	sync.Mutex
	m map[string]*heldLock
}{m: map[string]*heldLock{}}

// observation is when this process last saw a Lease change.
type observation struct {
	rv   string
	seen time.Time // on the Storage's Clock (the real one is monotonic)
}

var observed = struct {
	sync.Mutex
	m map[string]observation
}{m: map[string]observation{}}

func (s *Storage) tableKey(object string) string {
	return s.cfg.Endpoint + "|" + s.cfg.Namespace + "|" + s.cfg.Identity + "|" + object
}

// unchangedFor records the Lease's resourceVersion and returns how long
// this process has watched it unchanged: since it first saw it at that
// version, or since it could last not read it (forget), whichever is later.
func (s *Storage) unchangedFor(object string, l *lease) time.Duration {
	k := s.tableKey(object)
	now := s.cfg.Clock.Now()
	observed.Lock()
	defer observed.Unlock()
	o, ok := observed.m[k]
	if !ok || o.rv != l.Metadata.ResourceVersion {
		o = observation{rv: l.Metadata.ResourceVersion, seen: now}
		observed.m[k] = o
	}
	return now.Sub(o.seen)
}

func forget(k string) {
	observed.Lock()
	delete(observed.m, k)
	observed.Unlock()
}

// Lock blocks until it holds the lock name or ctx ends. It waits through an
// apiserver that is briefly away (restarting, overloaded, unreachable):
// certmagic gives up an issuance whose lock it cannot get, so one 503 must
// not cost a certificate. A refusal (RBAC, a bad token) ends it at once.
func (s *Storage) Lock(ctx context.Context, name string) (err error) {
	defer observe("lock", time.Now(), &err)
	id := newIdentity(s.cfg.Identity) // one per call, kept across attempts
	var failing error
	for {
		ok, err := s.tryOnce(ctx, name, id)
		switch {
		case ok:
			return nil
		case err != nil && !transient(err):
			return err
		case err != nil && failing == nil:
			s.logger.Warn("waiting for lock: the apiserver is unavailable; trying again",
				zap.String("lock", name), zap.Duration("every", s.cfg.PollInterval), zap.Error(err))
		}
		failing = err
		if !wait(s.cfg.Clock, s.cfg.PollInterval, ctx.Done()) {
			if failing != nil {
				return fmt.Errorf("waiting for lock %q: %w (last attempt: %v)", name, ctx.Err(), failing)
			}
			return fmt.Errorf("waiting for lock %q: %w", name, ctx.Err())
		}
	}
}

// TryLock takes the lock name if it is free (or its holder is gone), and
// reports whether it did; it never waits for a live holder.
func (s *Storage) TryLock(ctx context.Context, name string) (ok bool, err error) {
	defer observe("trylock", time.Now(), &err)
	return s.tryOnce(ctx, name, newIdentity(s.cfg.Identity))
}

func newIdentity(base string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return base + "/" + hex.EncodeToString(b)
}

// tryOnce makes one attempt as holder id: create the Lease, or take it over
// if it is released or stale. A conflict (someone else wrote first) is "not
// taken". A Lease already naming id was written by an earlier attempt of
// the same Lock call whose answer was lost: it is ours.
func (s *Storage) tryOnce(ctx context.Context, name, id string) (bool, error) {
	object := objectName(s.cfg.Prefix, "lock", name)
	k := s.tableKey(object)
	held.Lock()
	_, mine := held.m[k]
	held.Unlock()
	if mine {
		// Another goroutine of this process holds it: wait like any other
		// replica (one identity per Lock call, as FileStorage).
		return false, nil
	}
	now := s.cfg.Now().UTC().Format(microTime)
	spec := leaseSpec{HolderIdentity: id, LeaseDurationSeconds: int(s.cfg.LeaseDuration / time.Second), AcquireTime: now, RenewTime: now}

	cur, err := s.api.getLease(ctx, object)
	if isNotFound(err) {
		l, err := s.api.createLease(ctx, &lease{APIVersion: "coordination.k8s.io/v1", Kind: "Lease",
			Metadata: objectMeta{Name: object, Labels: map[string]string{labelStorage: s.cfg.Prefix},
				Annotations: map[string]string{annotationKey: name}},
			Spec: spec})
		if isConflict(err) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("lock %q: %w", name, err)
		}
		s.hold(name, object, id, l, "")
		return true, nil
	}
	if err != nil {
		// While we cannot see the Lease, its holder may not be able to renew
		// it either (apiserver down): staleness counts only time we watched.
		forget(k)
		return false, fmt.Errorf("lock %q: %w", name, err)
	}
	prev := cur.Spec.HolderIdentity
	if prev == id {
		s.hold(name, object, id, cur, "")
		return true, nil
	}
	if prev != "" {
		limit := time.Duration(cur.Spec.LeaseDurationSeconds) * time.Second
		if limit <= 0 {
			limit = s.cfg.LeaseDuration
		}
		if s.unchangedFor(object, cur) < limit {
			return false, nil
		}
	}
	spec.LeaseTransitions = cur.Spec.LeaseTransitions + 1
	next := *cur
	next.Spec = spec
	next.Metadata.Annotations = map[string]string{annotationKey: name}
	l, err := s.api.updateLease(ctx, &next)
	if isConflict(err) || isNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lock %q: %w", name, err)
	}
	s.hold(name, object, id, l, prev)
	return true, nil
}

// microTime is the wire format of metav1.MicroTime.
const microTime = "2006-01-02T15:04:05.000000Z07:00"

func (s *Storage) hold(name, object, id string, l *lease, stale string) {
	h := &heldLock{store: s, name: name, object: object, identity: id, lease: l,
		stop: make(chan struct{}), done: make(chan struct{})}
	held.Lock()
	held.m[s.tableKey(object)] = h
	held.Unlock()
	forget(s.tableKey(object))
	locksHeld.Inc()
	if stale != "" {
		s.logger.Warn("lock taken over from a stale holder",
			zap.String("lock", name), zap.String("lease", object),
			zap.String("holder", id), zap.String("stale_holder", stale),
			zap.Duration("unrenewed_for_at_least", s.cfg.LeaseDuration))
	} else {
		s.logger.Info("lock acquired", zap.String("lock", name), zap.String("lease", object), zap.String("holder", id))
	}
	go h.heartbeat()
}

// heartbeat renews the Lease every renew_interval until Unlock, or until
// another holder took it. Errors (apiserver down) are retried: the lock is
// lost only when someone else holds the Lease.
func (h *heldLock) heartbeat() {
	defer close(h.done)
	next := h.store.cfg.RenewInterval
	for wait(h.store.cfg.Clock, next, h.stop) {
		var lost bool
		if lost, next = h.renewSafely(); lost {
			return
		}
	}
}

// renewSafely is renew, and a panic in it (a bug, never the apiserver's
// answer) does not take the process down nor end the heartbeat: it is logged
// at error with the stack, and the renewal is tried again soon, so the lock
// is kept.
func (h *heldLock) renewSafely() (lost bool, wait time.Duration) {
	defer func() {
		if r := recover(); r != nil {
			h.store.logger.Error("lock heartbeat panicked; renewing again soon, the lock is kept",
				zap.String("lock", h.name), zap.String("holder", h.identity),
				zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			lost, wait = false, min(time.Second, h.store.cfg.RenewInterval)
		}
	}()
	return h.renew()
}

// renew renews the Lease once; lost is set when another holder took it,
// wait is how long until the next renewal.
func (h *heldLock) renew() (lost bool, wait time.Duration) {
	s := h.store
	h.mu.Lock()
	next := *h.lease
	h.mu.Unlock()
	next.Spec.RenewTime = s.cfg.Now().UTC().Format(microTime)
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
	defer cancel()
	l, err := s.api.updateLease(ctx, &next)
	var cur *lease
	if isConflict(err) || isNotFound(err) {
		// Did our last write land without us seeing the answer? Then
		// the Lease still names us.
		cur, err = s.api.getLease(ctx, h.object)
		switch {
		case err == nil && cur.Spec.HolderIdentity == h.identity:
			l = cur
		case err == nil || isNotFound(err):
			holder := "(deleted)"
			if err == nil {
				holder = cur.Spec.HolderIdentity
			}
			h.lose(holder)
			return true, 0
		}
	}
	if err != nil {
		renewals.WithLabelValues(result(err)).Inc()
		s.logger.Warn("renewing lock failed; retrying", zap.String("lock", h.name), zap.String("holder", h.identity), zap.Error(err))
		return false, min(time.Second, s.cfg.RenewInterval)
	}
	renewals.WithLabelValues("ok").Inc()
	h.mu.Lock()
	h.lease = l
	h.mu.Unlock()
	return false, s.cfg.RenewInterval
}

func (h *heldLock) lose(holder string) {
	h.mu.Lock()
	h.lost = holder
	h.mu.Unlock()
	renewals.WithLabelValues("lost").Inc()
	h.store.logger.Error("lock lost: another holder took it while we held it; the work it protects may run twice",
		zap.String("lock", h.name), zap.String("lease", h.object),
		zap.String("holder", h.identity), zap.String("new_holder", holder))
}

// Holder is the current holder of the lock name ("<identity>/<random>",
// one per Lock call), "" if it is free. It is exported for programs that
// watch a fleet's locks from outside: the integration suite (a module of
// its own, which no export_test.go reaches) asks it which replica holds a
// lock, since a lock's Lease name is a hash that only this package computes.
func (s *Storage) Holder(ctx context.Context, name string) (string, error) {
	l, err := s.api.getLease(ctx, objectName(s.cfg.Prefix, "lock", name))
	if isNotFound(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return l.Spec.HolderIdentity, nil
}

// ErrLockLost is returned by Unlock when the lock was taken over before it.
var ErrLockLost = errors.New("lock was taken over by another holder")

// Unlock releases the lock name held by this process: it stops the
// heartbeat and deletes the Lease, only if it is still ours.
func (s *Storage) Unlock(ctx context.Context, name string) (err error) {
	defer observe("unlock", time.Now(), &err)
	object := objectName(s.cfg.Prefix, "lock", name)
	k := s.tableKey(object)
	held.Lock()
	h := held.m[k]
	delete(held.m, k)
	held.Unlock()
	if h == nil {
		return fmt.Errorf("unlock %q: this process does not hold it", name)
	}
	locksHeld.Dec()
	close(h.stop)
	<-h.done // no renewal races the delete
	h.mu.Lock()
	l, lost := h.lease, h.lost
	h.mu.Unlock()
	if lost != "" {
		return fmt.Errorf("unlock %q: %w (%s)", name, ErrLockLost, lost)
	}
	for range 3 {
		err := h.store.api.deleteLease(ctx, object, l.Metadata.UID, l.Metadata.ResourceVersion)
		if err == nil || isNotFound(err) {
			s.logger.Info("lock released", zap.String("lock", name), zap.String("holder", h.identity))
			return nil
		}
		if !isConflict(err) {
			return fmt.Errorf("unlock %q: %w", name, err)
		}
		// Conflict: the Lease changed since our last write. Ours still
		// (a renewal we did not see the answer of)? Then delete that.
		cur, gerr := h.store.api.getLease(ctx, object)
		if isNotFound(gerr) {
			return nil
		}
		if gerr != nil {
			return fmt.Errorf("unlock %q: %w", name, gerr)
		}
		if cur.Spec.HolderIdentity != h.identity {
			h.lose(cur.Spec.HolderIdentity)
			return fmt.Errorf("unlock %q: %w (%s); its Lease is left to the new holder", name, ErrLockLost, cur.Spec.HolderIdentity)
		}
		l = cur
	}
	return fmt.Errorf("unlock %q: the Lease keeps changing under us", name)
}
