// Package discovery turns a Kubernetes headless Service reference into a live,
// sorted set of IP:port endpoints by asking the cluster's DNS, and keeps that set
// fresh in the background.
//
// Read it top to bottom as "ask DNS, keep the answer fresh, hand it out":
//
//   - service.go: a reference such as "backend.bbs:http" becomes a Service (FQDN,
//     record type, port) using the pod's namespace and cluster domain, which
//     Environment detects (with the resolvers) from what a pod sees.
//   - resolver.go: one DNS question to a list of servers (EDNS0 over UDP, TCP when
//     truncated, failover), with every outcome classified.
//   - answer.go: a DNS reply becomes endpoints, taking only records that belong to
//     the question and only a bounded number of them.
//   - watcher.go: one Watcher per distinct question (Config.Key) re-asks on a
//     TTL-clamped, jittered timer, keeps the last good set on errors and
//     publishes immutable Snapshots through an atomic pointer.
//   - health.go: the prober inside a Watcher checks every endpoint on its own
//     timer and publishes which ones pass (healthView), with slow start.
//   - endpoints.go: the endpoints one request may go to (Watcher.Endpoints):
//     the Snapshot's, filtered by health, thinned during a slow start, never
//     one that left DNS.
//   - status.go: one Status of a Watcher (state, health, Stats counted since it
//     started) for every reader to translate: admin endpoint, metrics.
//
// Beside that line of reading:
//
//   - validate.go: Config.Validate, every rule on a Config's values (floors on
//     intervals and timeouts, ranges, header names), and Config.Key.
//   - addresses.go: the AddressPolicy that drops loopback, link-local and
//     other addresses cluster DNS never hands out, unless allowed.
//   - warnings.go: a warning is repeated only when what it says changes, or
//     after warnRepeat: a DNS outage writes no log line per lookup.
//   - aside.go: an endpoint whose dial failed is set aside (no requests) until
//     a connection to it succeeds or it leaves DNS.
//   - sample.go: a Sampler hands each request a few of the eligible endpoints,
//     so the request path costs the same for 1 and 1,000 of them.
//   - doc.go: this overview. dnstest (its own package) is the in-process DNS
//     server of the tests, answering as docs/kube-dns-answers.md describes.
//
// Nothing in this package knows about Caddy; caddymodule is the glue.
package discovery
