package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-headless/caddy-headless/kubestore"
)

func init() {
	caddy.RegisterModule(K8sStorage{})
}

// The files a pod's service account brings.
const (
	serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"
	storageTimeout    = 10 * time.Second // one apiserver request
	lockPoll          = time.Second      // how often a waiting Lock looks again
)

// K8sStorage keeps Caddy's certificates, ACME account, challenge tokens and
// locks in Kubernetes: every storage key in a Secret, every lock in a Lease
// that its holder renews. Several Caddy replicas with the same storage
// share one ACME account and one certificate per name, and answer each
// other's ACME challenges.
//
// Out of the box it uses the pod's service account; the service account
// needs a Role in the namespace with secrets get, list, create, update,
// delete and leases get, create, update, delete (see the README).
type K8sStorage struct {
	// Namespace of the Secrets and Leases. Default: the pod's namespace
	// (the service account's namespace file).
	Namespace string `json:"namespace,omitempty"`

	// Prefix of every Secret and Lease name, so that several Caddy fleets
	// can share a namespace without sharing certificates. 1-40 lowercase
	// letters, digits and '-'. Default: caddy.
	Prefix string `json:"prefix,omitempty"`

	// Identity of this replica in the Leases it holds (the holder shows
	// as <identity>/<random>). Default: the hostname, which in a pod is the
	// pod's name.
	Identity string `json:"identity,omitempty"`

	// A lock whose holder has not renewed it for this long is taken over
	// (the holder crashed). Whole seconds. Default: 60s.
	LeaseDuration caddy.Duration `json:"lease_duration,omitempty"`

	// How often a held lock is renewed; at most half of lease_duration.
	// Default: min(15s, lease_duration/4), which is 15s with the default
	// lease.
	RenewInterval caddy.Duration `json:"renew_interval,omitempty"`

	// The apiserver, https://host:port. Default: in a pod,
	// https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.
	Endpoint string `json:"endpoint,omitempty"`

	// PEM file of the CA that signed the apiserver's certificate.
	// Default: the service account's ca.crt if it exists, else the
	// system's roots.
	CAFile string `json:"ca_file,omitempty"`

	// File with the bearer token, re-read every minute and on 401 (bound
	// service-account tokens rotate). Default: the service account's token.
	TokenFile string `json:"token_file,omitempty"`

	store *kubestore.Storage
}

// CaddyModule returns the Caddy module information.
func (K8sStorage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.k8s",
		New: func() caddy.Module { return new(K8sStorage) },
	}
}

// storageEnv is where the in-cluster defaults come from; tests replace it.
var storageEnv = struct {
	dir    string
	getenv func(string) string
}{serviceAccountDir, os.Getenv}

// config fills the defaults and returns the core's Config. Every error names
// the option to set.
func (s *K8sStorage) config() (kubestore.Config, error) {
	// Placeholders such as {env.POD_NAME} are replaced here, once.
	repl := caddy.NewReplacer()
	for _, f := range []*string{&s.Namespace, &s.Prefix, &s.Identity, &s.Endpoint, &s.CAFile, &s.TokenFile} {
		*f = repl.ReplaceKnown(*f, "")
	}
	c := kubestore.Config{
		Namespace: s.Namespace, Prefix: s.Prefix, Identity: s.Identity,
		LeaseDuration: time.Duration(s.LeaseDuration), RenewInterval: time.Duration(s.RenewInterval),
		Endpoint: s.Endpoint, CAFile: s.CAFile, TokenFile: s.TokenFile,
		RequestTimeout: storageTimeout, PollInterval: lockPoll,
	}
	sa := func(name string) string { return storageEnv.dir + "/" + name }
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	if c.Namespace == "" {
		b, err := os.ReadFile(sa("namespace"))
		if err != nil || strings.TrimSpace(string(b)) == "" {
			return c, fmt.Errorf("storage k8s: namespace: not set, and the service account's namespace file %s is missing (not in a pod?): set namespace", sa("namespace"))
		}
		c.Namespace = strings.TrimSpace(string(b))
	}
	if c.Prefix == "" {
		c.Prefix = "caddy"
	}
	if c.Identity == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			return c, fmt.Errorf("storage k8s: identity: not set, and the hostname is unknown (%v): set identity", err)
		}
		c.Identity = h
	}
	if c.LeaseDuration == 0 {
		c.LeaseDuration = 60 * time.Second
	}
	if c.RenewInterval == 0 {
		c.RenewInterval = min(15*time.Second, c.LeaseDuration/4)
	}
	if c.Endpoint == "" {
		host, port := storageEnv.getenv("KUBERNETES_SERVICE_HOST"), storageEnv.getenv("KUBERNETES_SERVICE_PORT")
		if host == "" || port == "" {
			return c, errors.New("storage k8s: endpoint: not set, and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not in the environment (not in a pod?): set endpoint")
		}
		c.Endpoint = "https://" + net.JoinHostPort(host, port)
	}
	if c.CAFile == "" && exists(sa("ca.crt")) {
		c.CAFile = sa("ca.crt")
	}
	if c.TokenFile == "" {
		if !exists(sa("token")) {
			return c, fmt.Errorf("storage k8s: token_file: not set, and the service account's token %s is missing: set token_file", sa("token"))
		}
		c.TokenFile = sa("token")
	}
	return c, nil
}

// Provision builds the storage and sends one request (a list of its
// Secrets), so that a wrong endpoint, CA, token or Role fails the config
// load with a clear error instead of the first certificate order.
func (s *K8sStorage) Provision(ctx caddy.Context) error {
	c, err := s.config()
	if err != nil {
		return err
	}
	s.store, err = kubestore.New(c, ctx.Logger())
	if err != nil {
		return fmt.Errorf("storage k8s: %w", err)
	}
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		for _, col := range kubestore.Collectors() {
			var are prometheus.AlreadyRegisteredError
			if err := reg.Register(col); err != nil && !errors.As(err, &are) {
				return fmt.Errorf("storage k8s: metrics: %w", err)
			}
		}
	}
	pctx, cancel := context.WithTimeout(ctx, storageTimeout)
	defer cancel()
	if err := s.store.Ping(pctx); err != nil {
		return fmt.Errorf("storage k8s: the apiserver at %s (endpoint) could not be used: %w", c.Endpoint, err)
	}
	return nil
}

// Cleanup releases the locks of Caddy CA key pairs that this config's
// storage took and did not finish writing (a config that failed to load
// while creating its CA), so other replicas need not wait for them to time
// out.
func (s *K8sStorage) Cleanup() error {
	if s.store != nil {
		s.store.ReleaseCAWrites()
	}
	return nil
}

// CertMagicStorage returns the storage for certmagic.
func (s *K8sStorage) CertMagicStorage() (certmagic.Storage, error) {
	if s.store == nil {
		return nil, errors.New("storage k8s: not provisioned")
	}
	return s.store, nil
}

// UnmarshalCaddyfile sets up the storage from Caddyfile tokens. Syntax:
//
//	storage k8s {
//	    namespace      <namespace>
//	    prefix         <name prefix>
//	    identity       <holder identity>
//	    lease_duration <duration>
//	    renew_interval <duration>
//	    endpoint       https://<host>:<port>
//	    ca_file        <pem file>
//	    token_file     <file>
//	}
func (s *K8sStorage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	if d.NextArg() {
		return d.Errf("storage k8s: unexpected argument %q; options go in a block", d.Val())
	}
	for d.NextBlock(0) {
		opt := d.Val()
		if !d.NextArg() {
			return d.Errf("storage k8s: %s takes one argument", opt)
		}
		v := d.Val()
		if d.NextArg() {
			return d.Errf("storage k8s: %s takes one argument, got extra %q", opt, d.Val())
		}
		var dur *caddy.Duration
		switch opt {
		case "namespace":
			s.Namespace = v
		case "prefix":
			s.Prefix = v
		case "identity":
			s.Identity = v
		case "endpoint":
			s.Endpoint = v
		case "ca_file":
			s.CAFile = v
		case "token_file":
			s.TokenFile = v
		case "lease_duration":
			dur = &s.LeaseDuration
		case "renew_interval":
			dur = &s.RenewInterval
		default:
			return d.Errf("storage k8s: unknown option %q (namespace, prefix, identity, lease_duration, renew_interval, endpoint, ca_file, token_file)", opt)
		}
		if dur != nil {
			x, err := caddy.ParseDuration(v)
			if err != nil || x <= 0 {
				return d.Errf("storage k8s: %s: want a positive duration, got %q", opt, v)
			}
			*dur = caddy.Duration(x)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner      = (*K8sStorage)(nil)
	_ caddy.StorageConverter = (*K8sStorage)(nil)
	_ caddy.CleanerUpper     = (*K8sStorage)(nil)
	_ caddyfile.Unmarshaler  = (*K8sStorage)(nil)
)
