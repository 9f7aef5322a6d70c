package kubestore

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// Caddy's local CA (caddypki) keeps each authority as two pairs of keys,
// pki/authorities/<id>/root.crt + root.key and intermediate.crt +
// intermediate.key. It loads a pair as "the certificate, then its key", and
// when the certificate is missing it generates a pair and stores it as "the
// certificate, then its key", without a lock. Replicas that start together
// on fresh storage therefore create two authorities (each keeps its own in
// memory: different roots), or one finds the certificate of another and its
// key not yet written (a failed start).
//
// The storage keeps one rule for these pairs, which needs nothing from
// caddypki beyond the order of its calls:
//
//   - Load of a pair's certificate returns it only when the pair is
//     complete: the key exists and belongs to the certificate. Otherwise
//     another replica is writing the pair, or one died while writing it:
//     the Load waits while a live replica holds the pair's lock, then either
//     finds the pair complete or takes the lock itself and answers "does not
//     exist", so that its caddypki generates the pair, under the lock.
//   - Store of a pair's certificate writes under the pair's lock (taken by
//     that Load, or now, for caddypki's renewal of the intermediate); Store of
//     the key releases it. The lock is a Lease like every other lock: a
//     replica killed while it holds it blocks the others for lease_duration.
//     A live replica that never stores the key (its write failed) releases it
//     when its config is cleaned up, and at the latest after CAWriteTimeout.
//
// The key read with a certificate handed out answers caddypki's Load of
// the key that follows, so a start that finds the pairs complete sends the
// same four GETs as without this rule, and caddypki gets the key it was
// shown with the certificate even if a renewal lands between its Loads.

// caPair names the keys and the lock of one pair of a caddypki authority.
type caPair struct {
	cert, key string // storage keys
	lock      string // lock name
}

// caPairOf recognizes the keys of caddypki's pairs; isCert tells which half.
func caPairOf(key string) (p caPair, isCert, ok bool) {
	parts := strings.Split(key, "/")
	if len(parts) != 4 || parts[0] != "pki" || parts[1] != "authorities" {
		return caPair{}, false, false
	}
	kind, ext, found := strings.Cut(parts[3], ".")
	if !found || (kind != "root" && kind != "intermediate") || (ext != "crt" && ext != "key") {
		return caPair{}, false, false
	}
	dir := strings.Join(parts[:3], "/")
	return caPair{
		cert: dir + "/" + kind + ".crt",
		key:  dir + "/" + kind + ".key",
		lock: "pki_" + parts[2] + "_" + kind,
	}, ext == "crt", true
}

// pairWrites are the pair locks this Storage took for a write it expects
// caddypki to finish (by storing the key), and the keys read with the
// certificates it handed out.
type pairWrites struct {
	mu   sync.Mutex
	m    map[string]*time.Timer // lock name → release after CAWriteTimeout
	keys map[string]readKey     // key storage key → read with the certificate handed out
}

type readKey struct {
	value []byte
	at    time.Time
}

// loadCACert is Load for the certificate of a pair.
func (s *Storage) loadCACert(ctx context.Context, p caPair) ([]byte, error) {
	cert, key, state, err := s.loadPair(ctx, p)
	if err != nil || state == pairComplete {
		return s.handOut(p, cert, key, err)
	}
	// Incomplete: wait for the replica that writes it, or write it ourselves.
	deadline := s.cfg.Clock.Now().Add(s.cfg.CAWriteTimeout + s.cfg.LeaseDuration + s.cfg.PollInterval)
	waited := false
	// The writer needs milliseconds: look again soon, then back off to
	// PollInterval (a dead writer is waited for lease_duration).
	poll := min(50*time.Millisecond, s.cfg.PollInterval)
	for {
		ok, lerr := s.TryLock(ctx, p.lock)
		if lerr != nil && !transient(lerr) {
			return nil, fmt.Errorf("loading %q: %w", p.cert, lerr)
		}
		if ok {
			cert, key, state, err = s.loadPair(ctx, p)
			if err != nil || state == pairComplete {
				s.unlockPair(p.lock)
				return s.handOut(p, cert, key, err)
			}
			if state != pairAbsent {
				s.logger.Warn("CA certificate without its key (a replica died between the two writes, or the key was removed): generating the pair again",
					zap.String("certificate", p.cert), zap.String("key", p.key), zap.String("state", state.String()))
			}
			s.reserve(p.lock)
			return nil, notExist(p.cert)
		}
		if !waited {
			holder, _ := s.Holder(ctx, p.lock)
			s.logger.Info("waiting for another replica to write the CA's keys", zap.String("certificate", p.cert), zap.String("holder", holder))
			waited = true
		}
		if s.cfg.Clock.Now().After(deadline) {
			holder, _ := s.Holder(ctx, p.lock)
			return nil, fmt.Errorf("loading %q: the pair is incomplete and its lock %q is still held by %q after %v (lease_duration plus the write timeout): %w",
				p.cert, p.lock, holder, s.cfg.CAWriteTimeout+s.cfg.LeaseDuration, errors.Join(lerr, context.DeadlineExceeded))
		}
		if !wait(s.cfg.Clock, poll, ctx.Done()) {
			return nil, fmt.Errorf("loading %q: waiting for the replica that writes it: %w", p.cert, ctx.Err())
		}
		poll = min(2*poll, s.cfg.PollInterval)
		if cert, key, state, err = s.loadPair(ctx, p); err != nil || state == pairComplete {
			return s.handOut(p, cert, key, err)
		}
	}
}

type pairState int

const (
	pairAbsent     pairState = iota // no certificate
	pairNoKey                       // a certificate, no key
	pairMismatched                  // the key is not the certificate's
	pairComplete
)

func (st pairState) String() string {
	return [...]string{"absent", "no key", "key does not match the certificate", "complete"}[st]
}

// loadPair reads both halves of p: the certificate if there is one, the
// key if there is one.
func (s *Storage) loadPair(ctx context.Context, p caPair) (cert, key []byte, _ pairState, _ error) {
	c, err := s.load(ctx, p.cert)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, pairAbsent, nil
	}
	if err != nil {
		return nil, nil, 0, err
	}
	cert = c.Data[dataField]
	k, err := s.load(ctx, p.key)
	if errors.Is(err, fs.ErrNotExist) {
		return cert, nil, pairNoKey, nil
	}
	if err != nil {
		return nil, nil, 0, err
	}
	key = k.Data[dataField]
	if !keyMatches(cert, key) {
		return cert, key, pairMismatched, nil
	}
	return cert, key, pairComplete, nil
}

// handOut returns a complete pair's certificate and keeps its key for the
// Load of the key that caddypki sends next, so that the key it gets is the
// one read with the certificate even if a renewal lands between its two
// Loads (and the key is not read twice).
func (s *Storage) handOut(p caPair, cert, key []byte, err error) ([]byte, error) {
	if err != nil {
		return nil, err
	}
	s.pairs.mu.Lock()
	if s.pairs.keys == nil {
		s.pairs.keys = map[string]readKey{}
	}
	s.pairs.keys[p.key] = readKey{value: key, at: time.Now()}
	s.pairs.mu.Unlock()
	return cert, nil
}

// loadCAKey is Load for the key of a pair: the key read with the
// certificate just handed out (once, and only for a short while), else the
// stored one.
func (s *Storage) loadCAKey(ctx context.Context, p caPair) ([]byte, error) {
	s.pairs.mu.Lock()
	k, ok := s.pairs.keys[p.key]
	delete(s.pairs.keys, p.key)
	s.pairs.mu.Unlock()
	if ok && time.Since(k.at) < s.cfg.RequestTimeout {
		return k.value, nil
	}
	sec, err := s.load(ctx, p.key)
	if err != nil {
		return nil, err
	}
	return sec.Data[dataField], nil
}

// keyMatches reports whether the private key in keyPEM belongs to the first
// certificate in certPEM. What does not parse is left to caddypki to
// report: it counts as matching.
func keyMatches(certPEM, keyPEM []byte) bool {
	b, _ := pem.Decode(certPEM)
	if b == nil {
		return true
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return true
	}
	k, err := certmagic.PEMDecodePrivateKey(keyPEM)
	if err != nil {
		return true
	}
	pub, ok := k.Public().(interface{ Equal(crypto.PublicKey) bool })
	return !ok || pub.Equal(c.PublicKey)
}

// storeCAPair is Store for either half of a pair.
func (s *Storage) storeCAPair(ctx context.Context, p caPair, isCert bool, value []byte) error {
	if !isCert {
		err := s.store(ctx, p.key, value)
		s.release(p.lock) // the pair is written (or failed): let the others look
		return err
	}
	if !s.reserved(p.lock) {
		// A write without the Load that found the pair missing: caddypki's
		// renewal of the intermediate. Writers of one pair take turns, so the
		// stored pair is never one writer's certificate with another's key.
		if err := s.Lock(ctx, p.lock); err != nil {
			return fmt.Errorf("storing %q: %w", p.cert, err)
		}
		s.reserve(p.lock)
	}
	err := s.store(ctx, p.cert, value)
	if err != nil {
		s.release(p.lock) // caddypki gives up: it will not store the key
	}
	return err
}

func (s *Storage) reserved(lock string) bool {
	s.pairs.mu.Lock()
	defer s.pairs.mu.Unlock()
	_, ok := s.pairs.m[lock]
	return ok
}

// reserve keeps the held pair lock until the key is stored, the config is
// cleaned up, or CAWriteTimeout passes.
func (s *Storage) reserve(lock string) {
	s.pairs.mu.Lock()
	defer s.pairs.mu.Unlock()
	if s.pairs.m == nil {
		s.pairs.m = map[string]*time.Timer{}
	}
	s.pairs.m[lock] = time.AfterFunc(s.cfg.CAWriteTimeout, func() {
		s.logger.Warn("the CA's key was not stored in time after its certificate was found missing; releasing its lock",
			zap.String("lock", lock), zap.Duration("write_timeout", s.cfg.CAWriteTimeout))
		s.release(lock)
	})
}

// release unlocks a pair lock this Storage holds, if it does.
func (s *Storage) release(lock string) {
	s.pairs.mu.Lock()
	t, ok := s.pairs.m[lock]
	delete(s.pairs.m, lock)
	s.pairs.mu.Unlock()
	if !ok {
		return
	}
	t.Stop()
	s.unlockPair(lock)
}

func (s *Storage) unlockPair(lock string) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
	defer cancel()
	if err := s.Unlock(ctx, lock); err != nil {
		s.logger.Warn("releasing the lock of a CA key pair", zap.String("lock", lock), zap.Error(err))
	}
}

// ReleaseCAWrites releases the locks of CA key pairs that this Storage took
// and whose write has not finished. The Caddy module calls it when its
// config is cleaned up (a config that failed to load, or was replaced).
func (s *Storage) ReleaseCAWrites() {
	s.pairs.mu.Lock()
	var locks []string
	for l := range s.pairs.m {
		locks = append(locks, l)
	}
	s.pairs.mu.Unlock()
	for _, l := range locks {
		s.release(l)
	}
}
