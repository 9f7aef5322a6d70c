package kubestore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-headless/caddy-headless/internal/clock"
)

// Config says where the storage keeps its objects and how it locks.
// Every field must be set (the Caddy module fills the defaults).
type Config struct {
	Endpoint  string // apiserver, https://host:port
	CAFile    string // PEM bundle that verifies the apiserver; empty: system roots
	TokenFile string // bearer token, re-read as it rotates; empty: no token
	Namespace string
	Prefix    string // first part of every object name; one per Caddy fleet
	Identity  string // this replica in Lease holders (hostname, pod name)

	LeaseDuration  time.Duration // a holder unseen this long has lost its lock
	RenewInterval  time.Duration // heartbeat of a held lock
	RequestTimeout time.Duration // one apiserver request
	PollInterval   time.Duration // how often a waiting Lock looks again

	// CAWriteTimeout bounds how long a live replica that found one of
	// Caddy's CA key pairs missing keeps the others waiting for it to write
	// the pair (see pki.go). Zero: 2 minutes.
	CAWriteTimeout time.Duration

	// Clock is the time a Storage measures Leases by and waits on: how long
	// a Lease has gone unchanged, the poll of a waiting Lock, the heartbeat
	// of a held one, a Load waiting for a CA pair's writer. Nil: the real
	// clock, whose readings are monotonic, so a step of the wall clock
	// expires no lock. Tests pass one they move by hand, instead of
	// sleeping through lease durations (client-go's leader election takes
	// a clock for the same reason).
	Clock Clock `json:"-"`

	// Now is the wall clock written into objects (modified times, Lease
	// times) for humans and for Stat. Expiry never depends on it
	// (TestWallClockStepsDoNotExpireLocks steps it alone). Nil: Clock's Now.
	Now func() time.Time `json:"-"`
}

// Storage is a certmagic.Storage (and TryLocker) on Kubernetes Secrets and
// Leases. It is safe for concurrent use.
type Storage struct {
	cfg    Config
	api    *client
	logger *zap.Logger
	pairs  pairWrites // CA key pairs this Storage is writing
}

// A Storage is what certmagic and Caddy use: a Storage with locks, and
// TryLock for the locks that must not wait.
var (
	_ certmagic.Storage   = (*Storage)(nil)
	_ certmagic.TryLocker = (*Storage)(nil)
)

// New checks cfg and builds the storage. It reads the CA and token files
// but sends nothing; Ping does.
func New(cfg Config, logger *zap.Logger) (*Storage, error) {
	if err := validPrefix(cfg.Prefix); err != nil {
		return nil, err
	}
	if cfg.Namespace == "" {
		return nil, errors.New("namespace is empty")
	}
	if cfg.Identity == "" {
		return nil, errors.New("identity is empty")
	}
	if cfg.LeaseDuration < time.Second || cfg.LeaseDuration%time.Second != 0 {
		return nil, fmt.Errorf("lease_duration %v: want whole seconds, at least 1s (a Lease holds seconds)", cfg.LeaseDuration)
	}
	if cfg.RenewInterval <= 0 || cfg.RenewInterval > cfg.LeaseDuration/2 {
		return nil, fmt.Errorf("renew_interval %v: want more than 0 and at most half of lease_duration (%v), so one lost heartbeat does not lose the lock", cfg.RenewInterval, cfg.LeaseDuration)
	}
	if cfg.RequestTimeout <= 0 || cfg.PollInterval <= 0 {
		return nil, errors.New("request timeout and poll interval must be positive")
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.Now == nil {
		cfg.Now = cfg.Clock.Now
	}
	if cfg.CAWriteTimeout <= 0 {
		cfg.CAWriteTimeout = 2 * time.Minute
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	api, err := newClient(cfg.Endpoint, cfg.Namespace, cfg.CAFile, cfg.TokenFile, cfg.RequestTimeout)
	if err != nil {
		return nil, err
	}
	return &Storage{cfg: cfg, api: api, logger: logger}, nil
}

// Ping proves that the apiserver answers and lets this identity list the
// storage's Secrets (a first request at provision, so a wrong endpoint, CA,
// token or Role is an error when the config loads, not at the first ACME order).
func (s *Storage) Ping(ctx context.Context) error {
	_, err := s.api.listSecrets(ctx, selector(s.cfg.Prefix, ""), 1)
	return err
}

func (s *Storage) String() string {
	return fmt.Sprintf("k8s:%s/%s/%s", s.cfg.Endpoint, s.cfg.Namespace, s.cfg.Prefix)
}

// owned checks that a Secret found under key's name really is key's.
func (s *Storage) owned(sec *secret, key string) error {
	if sec.Metadata.Annotations[annotationKey] != key || sec.Metadata.Labels[labelStorage] != s.cfg.Prefix {
		return fmt.Errorf("secret %s in %q holds key %q of prefix %q, not %q of %q: refusing to mix two keys (a name collision, or a Secret not written by this storage)",
			sec.Metadata.Name, s.cfg.Namespace, sec.Metadata.Annotations[annotationKey], sec.Metadata.Labels[labelStorage], key, s.cfg.Prefix)
	}
	return nil
}

// Store puts value at key, creating or replacing its Secret. The keys of
// Caddy's local CA are written a pair at a time (pki.go).
func (s *Storage) Store(ctx context.Context, key string, value []byte) (err error) {
	defer observe("store", time.Now(), &err)
	if p, isCert, ok := caPairOf(key); ok {
		return s.storeCAPair(ctx, p, isCert, value)
	}
	return s.store(ctx, key, value)
}

func (s *Storage) store(ctx context.Context, key string, value []byte) error {
	if err := checkKey(key); err != nil {
		return err
	}
	if len(value) > MaxValueSize {
		return fmt.Errorf("storing %q: value is %d bytes; a Kubernetes Secret holds at most %d", key, len(value), MaxValueSize)
	}
	name := objectName(s.cfg.Prefix, "key", key)
	want := secret{
		APIVersion: "v1", Kind: "Secret", Type: secretType,
		Metadata: objectMeta{
			Name:        name,
			Labels:      keyLabels(s.cfg.Prefix, key),
			Annotations: map[string]string{annotationKey: key, annotationMod: s.cfg.Now().UTC().Format(time.RFC3339Nano)},
		},
		Data: map[string][]byte{dataField: value},
	}
	// Read, then create or update at the resourceVersion read; a conflict
	// means another writer came between: read again (last writer wins,
	// as with files).
	for range 10 {
		cur, err := s.api.getSecret(ctx, name)
		switch {
		case isNotFound(err):
			want.Metadata.ResourceVersion = "" // a create carries none
			if _, err = s.api.createSecret(ctx, &want); !isConflict(err) {
				return wrapKey("storing", key, err)
			}
		case err != nil:
			return wrapKey("storing", key, err)
		default:
			if err := s.owned(cur, key); err != nil {
				return err
			}
			want.Metadata.ResourceVersion = cur.Metadata.ResourceVersion
			if _, err = s.api.updateSecret(ctx, &want); !isConflict(err) && !isNotFound(err) {
				return wrapKey("storing", key, err)
			}
		}
		if err := ctx.Err(); err != nil {
			return wrapKey("storing", key, err)
		}
	}
	return fmt.Errorf("storing %q: its Secret %s changed under every one of 10 attempts", key, name)
}

func wrapKey(op, key string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s %q: %w", op, key, err)
}

// notExist is certmagic's "no such key": errors.Is(err, fs.ErrNotExist).
func notExist(key string) error {
	return &fs.PathError{Op: "load", Path: key, Err: fs.ErrNotExist}
}

// Load returns the value at key, or an fs.ErrNotExist error. The
// certificate of one of Caddy's CA key pairs is returned only with its key
// (pki.go).
func (s *Storage) Load(ctx context.Context, key string) (_ []byte, err error) {
	defer observe("load", time.Now(), &err)
	if p, isCert, ok := caPairOf(key); ok {
		if isCert {
			return s.loadCACert(ctx, p)
		}
		return s.loadCAKey(ctx, p)
	}
	sec, err := s.load(ctx, key)
	if err != nil {
		return nil, err
	}
	return sec.Data[dataField], nil
}

func (s *Storage) load(ctx context.Context, key string) (*secret, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	sec, err := s.api.getSecret(ctx, objectName(s.cfg.Prefix, "key", key))
	if isNotFound(err) {
		return nil, notExist(key)
	}
	if err != nil {
		return nil, wrapKey("loading", key, err)
	}
	if err := s.owned(sec, key); err != nil {
		return nil, err
	}
	return sec, nil
}

// below returns the Secrets of every key strictly below dir.
func (s *Storage) below(ctx context.Context, dir string, limit int) ([]secret, error) {
	items, err := s.api.listSecrets(ctx, selector(s.cfg.Prefix, dir), limit)
	if err != nil {
		return nil, err
	}
	// The label is a hash: check the keys themselves.
	kept := items[:0]
	for _, it := range items {
		k := it.Metadata.Annotations[annotationKey]
		if dir == "" || strings.HasPrefix(k, dir+"/") {
			kept = append(kept, it)
		}
	}
	return kept, nil
}

// Delete removes key and, if key is a directory, every key below it. Keys
// that are already gone are not an error.
func (s *Storage) Delete(ctx context.Context, key string) (err error) {
	defer observe("delete", time.Now(), &err)
	key = normDir(key)
	if err := checkKey(key); err != nil {
		return err
	}
	items, err := s.below(ctx, key, 0)
	if err != nil {
		return wrapKey("deleting", key, err)
	}
	if sec, err := s.load(ctx, key); err == nil {
		items = append(items, *sec)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, it := range items {
		// The uid precondition deletes exactly the object read, never one
		// that a Store made since under the same name.
		err := s.api.deleteSecret(ctx, it.Metadata.Name, it.Metadata.UID)
		if err != nil && !isNotFound(err) && !isConflict(err) {
			return wrapKey("deleting", it.Metadata.Annotations[annotationKey], err)
		}
	}
	return nil
}

// Exists reports whether key is a key or a directory of keys.
func (s *Storage) Exists(ctx context.Context, key string) bool {
	var err error
	defer observe("exists", time.Now(), &err)
	if _, err = s.load(ctx, key); err == nil {
		return true
	}
	items, err := s.below(ctx, normDir(key), 1)
	return err == nil && len(items) > 0
}

// List returns the keys below dir: the direct children (keys and
// directories) or, if recursive, every key and directory below it.
func (s *Storage) List(ctx context.Context, dir string, recursive bool) (_ []string, err error) {
	defer observe("list", time.Now(), &err)
	dir = normDir(dir)
	if dir != "" {
		if err := checkKey(dir); err != nil {
			return nil, err
		}
	}
	items, err := s.below(ctx, dir, 0)
	if err != nil {
		return nil, wrapKey("listing", dir, err)
	}
	if len(items) == 0 {
		if dir != "" {
			if _, err := s.load(ctx, dir); err == nil {
				return []string{}, nil // a key, not a directory: nothing below it
			}
		}
		return nil, &fs.PathError{Op: "list", Path: dir, Err: fs.ErrNotExist}
	}
	seen := map[string]bool{}
	for _, it := range items {
		rel := it.Metadata.Annotations[annotationKey]
		if dir != "" {
			rel = rel[len(dir)+1:]
		}
		parts := strings.Split(rel, "/")
		if !recursive {
			parts = parts[:1]
		}
		for i := range parts {
			seen[path.Join(dir, strings.Join(parts[:i+1], "/"))] = true
		}
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys, nil
}

// Stat describes key: a key with its size and last modification, or a
// directory (IsTerminal false).
func (s *Storage) Stat(ctx context.Context, key string) (_ certmagic.KeyInfo, err error) {
	defer observe("stat", time.Now(), &err)
	sec, err := s.load(ctx, key)
	if err == nil {
		mod, perr := time.Parse(time.RFC3339Nano, sec.Metadata.Annotations[annotationMod])
		if perr != nil {
			return certmagic.KeyInfo{}, fmt.Errorf("stat %q: secret %s has no valid %s annotation: %v", key, sec.Metadata.Name, annotationMod, perr)
		}
		return certmagic.KeyInfo{Key: key, Modified: mod, Size: int64(len(sec.Data[dataField])), IsTerminal: true}, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return certmagic.KeyInfo{}, err
	}
	items, lerr := s.below(ctx, normDir(key), 1)
	if lerr != nil {
		return certmagic.KeyInfo{}, wrapKey("stat", key, lerr)
	}
	if len(items) == 0 {
		return certmagic.KeyInfo{}, &fs.PathError{Op: "stat", Path: key, Err: fs.ErrNotExist}
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}

// result names the outcome of an operation for the metrics.
func result(err error) string {
	var ae *APIError
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, fs.ErrNotExist):
		return "not_found"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.As(err, &ae):
		if ae.Code == http.StatusForbidden || ae.Code == http.StatusUnauthorized {
			return "denied"
		}
		return "api_" + strconv.Itoa(ae.Code)
	}
	return "error"
}
