// Package integration is the end-to-end suite of caddy-headless: a Caddy
// binary built by xcaddy from the checkout, in front of "VMs" (network
// namespaces with their own addresses) that are published as headless
// Services without selectors on a real Kubernetes control plane (etcd and
// kube-apiserver), found through a real CoreDNS with its kubernetes plugin,
// with certificates from a real ACME CA (Pebble).
//
// The tools are built by build-tools.sh; run.sh builds them and runs the suite.
// The suite needs root (network namespaces) and iproute2.
package integration
