// Package kubestore is a certmagic.Storage on Kubernetes: every key in a
// Secret, every lock in a Lease, so that several Caddy replicas share one
// ACME account, one certificate per name and each other's challenge tokens.
// It knows certmagic and the Kubernetes REST API, not Caddy; the Caddy module
// caddy.storage.k8s (package caddymodule) configures it.
//
// Files:
//   - client.go: the typed calls (get, create, update, delete with
//     preconditions, list by label) on the shared REST client of package
//     kubeapi, which carries the apiserver's Status in errors and re-reads
//     the service-account token as it rotates
//   - names.go: keys and lock names → valid, injective object names and labels
//   - storage.go: Store, Load, Delete, Exists, List, Stat
//   - locks.go: Lock, TryLock, Unlock on Leases with a heartbeat
//   - pki.go: Caddy's local CA on shared storage: a key pair loaded only
//     complete, and written by one replica under the pair's Lease
//   - clock.go: the clock the locks wait on (internal/clock; tests move it)
//   - metrics.go: the caddy_headless_storage_* metrics
package kubestore
