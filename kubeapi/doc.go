// Package kubeapi is the one small Kubernetes REST client of the plugin,
// shared by the certificate storage (package kubestore: Secrets and Leases)
// and the EndpointSlice watch of `via api` (package discovery): requests
// with a bearer token that is re-read as it rotates, the cluster's CA, the
// apiserver's Status in errors (a 403 names the verb, resource and
// namespace the service account lacks), and a decoder of watch streams.
// No client-go: it would add ~25 MB to every Caddy binary.
//
// Files:
//   - client.go: Client, Do, TokenSource, APIError and the error classes
//   - watch.go: Watch, the stream of watch events (BOOKMARK, ERROR with a
//     410 Gone Status → relist)
package kubeapi
