package caddymodule

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddypki"
	"go.uber.org/zap"

	"github.com/caddy-headless/caddy-headless/internal/poll"
	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddy-headless/caddy-headless/kubestore/kubetest"
)

// TestStorageK8sHoldsCaddysCertificates runs Caddy in-process with
// storage k8s on the fake apiserver: the certificate Caddy obtains (from
// its internal CA) and the CA itself land in Secrets, the server presents
// that certificate, and every lock is released afterwards.
func TestStorageK8sHoldsCaddysCertificates(t *testing.T) {
	api := kubetest.New(t, "caddy")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := map[string]any{
		"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"storage": map[string]any{
			"module": "k8s", "endpoint": api.Config("").Endpoint, "ca_file": api.Config("").CAFile,
			"token_file": api.Config("").TokenFile, "namespace": "caddy", "identity": "test-replica",
		},
		"apps": map[string]any{
			"pki": map[string]any{"certificate_authorities": map[string]any{"local": map[string]any{"install_trust": false}}},
			"tls": map[string]any{"automation": map[string]any{"policies": []any{
				map[string]any{"subjects": []string{"a.test"}, "issuers": []any{map[string]any{"module": "internal"}}},
			}}},
			"http": map[string]any{"servers": map[string]any{"s": map[string]any{
				"listen": []string{addr},
				"routes": []any{map[string]any{
					"match":  []any{map[string]any{"host": []string{"a.test"}}},
					"handle": []any{map[string]any{"handler": "static_response", "body": "ok"}},
				}},
				"automatic_https": map[string]any{"disable_redirects": true},
			}}},
		},
	}
	b, _ := json.Marshal(cfg)
	if err := caddy.Load(b, true); err != nil {
		t.Fatalf("loading a config with storage k8s: %v", err)
	}
	t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })

	c := api.Config("caddy")
	c.Prefix, c.Identity = "caddy", "reader"
	reader, err := kubestore.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	var crt []byte
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if crt, err = reader.Load(context.Background(), "certificates/local/a.test/a.test.crt"); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("the certificate for a.test never appeared in the Secrets: %v; Secrets: %q", err, api.SecretNames("caddy"))
	}
	if _, err := reader.Load(context.Background(), "pki/authorities/local/root.crt"); err != nil {
		t.Fatalf("the local CA's root is not in the storage: %v", err)
	}
	// The Secret is written before Caddy puts the certificate in its cache:
	// until then a handshake fails with "internal error".
	var conn *tls.Conn
	poll.Until(t, "Caddy serving a.test", func() bool {
		conn, err = tls.Dial("tcp", addr, &tls.Config{ServerName: "a.test", InsecureSkipVerify: true})
		return err == nil
	}, func() string { return fmt.Sprintf("last handshake: %v", err) })
	served := conn.ConnectionState().PeerCertificates[0].Raw
	conn.Close()
	if !strings.Contains(string(crt), "BEGIN CERTIFICATE") || !strings.Contains(string(crt), pemBody(served)) {
		t.Fatal("the served certificate is not the one in the Secret")
	}
	if !slices.ContainsFunc(api.Requests(), func(r string) bool { return strings.HasPrefix(r, "create leases") }) {
		t.Fatalf("obtaining the certificate took no lock in a Lease; requests: %q", api.Requests())
	}
}

// pemBody is the base64 lines of a PEM certificate, without the armor.
func pemBody(der []byte) string {
	s := strings.Split(strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))), "\n")
	return strings.Join(s[1:len(s)-1], "\n")
}

// TestStorageK8sDefaultsFromThePod: with no options, a pod's service
// account files and KUBERNETES_SERVICE_* give everything.
func TestStorageK8sDefaultsFromThePod(t *testing.T) {
	api := kubetest.New(t, "from-file")
	sa := fakeServiceAccount(t, api, "from-file")
	host, port, _ := net.SplitHostPort(strings.TrimPrefix(api.Config("").Endpoint, "https://"))
	withStorageEnv(t, sa, map[string]string{"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port})
	var s K8sStorage
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := s.Provision(ctx); err != nil {
		t.Fatalf("Provision with the pod's defaults: %v", err)
	}
	c, _ := s.config()
	hn, _ := os.Hostname()
	if c.Namespace != "from-file" || c.Prefix != "caddy" || c.Identity != hn || c.LeaseDuration != 60*time.Second ||
		c.RenewInterval != 15*time.Second || c.TokenFile != filepath.Join(sa, "token") || c.CAFile != filepath.Join(sa, "ca.crt") {
		t.Fatalf("defaults: %+v", c)
	}
}

// TestStorageK8sErrorsNameTheOption: what cannot work fails the config
// load, naming the option.
func TestStorageK8sErrorsNameTheOption(t *testing.T) {
	api := kubetest.New(t, "caddy")
	good := api.Config("caddy")
	empty := t.TempDir()
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadURL := "https://" + dead.Addr().String()
	dead.Close()
	for _, tc := range []struct {
		name string
		s    K8sStorage
		env  map[string]string
		want []string
	}{
		{"no namespace out of cluster", K8sStorage{Endpoint: good.Endpoint, TokenFile: good.TokenFile}, nil, []string{"namespace", "set namespace"}},
		{"no endpoint out of cluster", K8sStorage{Namespace: "caddy", TokenFile: good.TokenFile}, nil, []string{"endpoint", "KUBERNETES_SERVICE_HOST"}},
		{"no token out of cluster", K8sStorage{Namespace: "caddy", Endpoint: good.Endpoint}, nil, []string{"token_file"}},
		{"unreadable CA", K8sStorage{Namespace: "caddy", Endpoint: good.Endpoint, TokenFile: good.TokenFile, CAFile: filepath.Join(empty, "nope.crt")}, nil, []string{"ca_file"}},
		{"unreadable token", K8sStorage{Namespace: "caddy", Endpoint: good.Endpoint, TokenFile: filepath.Join(empty, "nope")}, nil, []string{"token_file"}},
		{"unreachable endpoint", K8sStorage{Namespace: "caddy", Endpoint: deadURL, CAFile: good.CAFile, TokenFile: good.TokenFile}, nil, []string{deadURL, "(endpoint)", "did not answer"}},
		{"namespace refused by RBAC", K8sStorage{Namespace: "kube-system", Endpoint: good.Endpoint, CAFile: good.CAFile, TokenFile: good.TokenFile}, nil, []string{"403", `"list"`, `"secrets"`, `"kube-system"`}},
		{"bad prefix", K8sStorage{Namespace: "caddy", Prefix: "Edge_1", Endpoint: good.Endpoint, CAFile: good.CAFile, TokenFile: good.TokenFile}, nil, []string{"prefix"}},
		{"renew too slow", K8sStorage{Namespace: "caddy", LeaseDuration: caddy.Duration(10 * time.Second), RenewInterval: caddy.Duration(6 * time.Second), Endpoint: good.Endpoint, CAFile: good.CAFile, TokenFile: good.TokenFile}, nil, []string{"renew_interval", "half of lease_duration"}},
		{"lease not whole seconds", K8sStorage{Namespace: "caddy", LeaseDuration: caddy.Duration(2500 * time.Millisecond), Endpoint: good.Endpoint, CAFile: good.CAFile, TokenFile: good.TokenFile}, nil, []string{"lease_duration", "whole seconds"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			withStorageEnv(t, empty, tc.env)
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			s := tc.s
			err := s.Provision(ctx)
			for _, w := range tc.want {
				if err == nil || !strings.Contains(err.Error(), w) {
					t.Fatalf("Provision: %v; want an error containing %q", err, w)
				}
			}
		})
	}
}

func withStorageEnv(t *testing.T, dir string, env map[string]string) {
	old := storageEnv
	storageEnv.dir = dir
	storageEnv.getenv = func(k string) string { return env[k] }
	t.Cleanup(func() { storageEnv = old })
}

// fakeServiceAccount writes the files a pod's service account has.
func fakeServiceAccount(t *testing.T, api *kubetest.API, ns string) string {
	dir := t.TempDir()
	c := api.Config(ns)
	for name, src := range map[string]string{"token": c.TokenFile, "ca.crt": c.CAFile} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "namespace"), []byte(ns), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestStorageK8sOneLocalCAForReplicasStartingTogether runs Caddy's own
// caddypki (v2.11.9, unchanged) in three "replicas" (three storage k8s
// modules with their own identities) that provision the local CA at the
// same moment on fresh storage, 10 rounds: every provisioning succeeds and
// all three hold one root, the stored one.
func TestStorageK8sOneLocalCAForReplicasStartingTogether(t *testing.T) {
	api := kubetest.New(t, "caddy")
	api.BeforeRequest(func(verb, resource, _ string) { // a busy apiserver: wider windows
		if resource == "secrets" && (verb == "create" || verb == "update") {
			time.Sleep(5 * time.Millisecond)
		}
	})
	c := api.Config("caddy")
	for round := range 10 {
		prefix := fmt.Sprintf("round-%d", round)
		roots := make([][]byte, 3)
		errs := make([]error, 3)
		var wg sync.WaitGroup
		gate := make(chan struct{})
		for i := range 3 {
			wg.Go(func() {
				raw, _ := json.Marshal(map[string]any{"module": "k8s", "endpoint": c.Endpoint, "ca_file": c.CAFile, "token_file": c.TokenFile,
					"namespace": "caddy", "prefix": prefix, "identity": fmt.Sprintf("replica-%d", i)})
				ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
				defer cancel()
				ca := &caddypki.CA{StorageRaw: raw}
				<-gate
				if errs[i] = ca.Provision(ctx, "local", zap.NewNop()); errs[i] == nil {
					roots[i] = ca.RootCertificate().Raw
				}
			})
		}
		close(gate)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("round %d: replica %d: provisioning CA 'local': %v", round, i, err)
			}
		}
		if !bytes.Equal(roots[0], roots[1]) || !bytes.Equal(roots[1], roots[2]) {
			t.Errorf("round %d: the three replicas hold different roots", round)
		}
	}
	if n := len(api.LeaseNames("caddy")); n != 0 {
		t.Fatalf("%d Leases left after the CAs were provisioned", n)
	}
}

// TestStorageK8sCleanupReleasesAnUnfinishedCA: a config found the local
// CA's root missing (so its storage holds the pair's lock) and then failed
// to load; its Cleanup releases the lock, and another replica provisions
// the CA without waiting for the write timeout.
func TestStorageK8sCleanupReleasesAnUnfinishedCA(t *testing.T) {
	api := kubetest.New(t, "caddy")
	c := api.Config("caddy")
	module := func(identity string) *K8sStorage {
		s := &K8sStorage{Namespace: "caddy", Endpoint: c.Endpoint, CAFile: c.CAFile, TokenFile: c.TokenFile, Identity: identity,
			LeaseDuration: caddy.Duration(time.Hour), RenewInterval: caddy.Duration(time.Minute)}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		t.Cleanup(cancel)
		if err := s.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		return s
	}
	failed := module("failed")
	st, _ := failed.CertMagicStorage()
	if _, err := st.Load(context.Background(), "pki/authorities/local/root.crt"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of the root on fresh storage: %v", err)
	}
	if n := len(api.LeaseNames("caddy")); n != 1 {
		t.Fatalf("%d Leases while the root is to be written, want its pair's lock", n)
	}
	if err := failed.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if n := len(api.LeaseNames("caddy")); n != 0 {
		t.Fatalf("%d Leases after the failed config's Cleanup: the others would wait for the write timeout", n)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	raw, _ := json.Marshal(map[string]any{"module": "k8s", "endpoint": c.Endpoint, "ca_file": c.CAFile, "token_file": c.TokenFile,
		"namespace": "caddy", "identity": "other"})
	if err := (&caddypki.CA{StorageRaw: raw}).Provision(ctx, "local", zap.NewNop()); err != nil {
		t.Fatalf("provisioning after the failed config's cleanup: %v", err)
	}
}
