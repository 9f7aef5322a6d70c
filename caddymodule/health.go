package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-headless/caddy-headless/discovery"
)

// HealthChecks configures active health checks of the discovered endpoints.
// Caddy's own active health checks never run on dynamic upstreams; these do:
// every endpoint is probed on its own timer, and requests go only to the
// endpoints that pass. The names and meanings follow Caddy's `health_*`
// options where they match. The probes and their results are shared by every
// handler that asks the same question with the same checks, and survive
// config reloads; an endpoint that leaves DNS is forgotten.
type HealthChecks struct {
	// How to probe: `http` sends a request and checks the response; `tcp`
	// only opens a connection. Default: http.
	Mode string `json:"mode,omitempty"`

	// The URI (path and query) of the HTTP probe. Default: /
	URI string `json:"uri,omitempty"`

	// The port to probe instead of each endpoint's own.
	Port int `json:"port,omitempty"`

	// The HTTP method of the probe. Default: GET
	Method string `json:"method,omitempty"`

	// Headers sent with the probe; a Host header sets the request's Host.
	// They go to every endpoint DNS names: keep secrets out of them, or
	// restrict the endpoints with allow_cidrs.
	Headers http.Header `json:"headers,omitempty"`

	// How often each endpoint is probed. Default: 30s
	Interval caddy.Duration `json:"interval,omitempty"`

	// Each wait between probes is shortened by a random part of this, so
	// endpoints are not probed in lockstep. Default: interval/10.
	Jitter caddy.Duration `json:"jitter,omitempty"`

	// How long one probe may take (connect, TLS, response). Default: 5s
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Consecutive passes that make an unhealthy endpoint healthy again. Default: 1
	Passes int `json:"passes,omitempty"`

	// Consecutive failures that make a healthy endpoint unhealthy. Default: 1
	Fails int `json:"fails,omitempty"`

	// The expected status code; a single digit means a class (2 means 2xx).
	// Default: 2xx. Redirects are not followed.
	ExpectStatus int `json:"expect_status,omitempty"`

	// A regular expression the response body (its first 64 KiB) must match.
	ExpectBody string `json:"expect_body,omitempty"`

	// The most probes of this Service running at once. Default: 16
	MaxInFlight int `json:"max_in_flight,omitempty"`

	// Send requests to a new endpoint before its first probe finishes. By
	// default a new endpoint gets requests only after its first probe passes.
	Optimistic bool `json:"optimistic,omitempty"`

	// When no endpoint passes, fail the requests (502) instead of sending them
	// to every discovered endpoint. Default: false, fail open, as Envoy's panic mode.
	FailFast bool `json:"fail_fast,omitempty"`

	// Probe over HTTPS with these settings. Default: plain HTTP (the
	// headless_proxy directive turns it on for https:// services).
	TLS *HealthTLS `json:"tls,omitempty"`
}

// HealthTLS configures HTTPS probes.
type HealthTLS struct {
	// The name the endpoint's certificate must be valid for (and sent as SNI);
	// probes dial IP addresses, so set it unless the certificate holds the IPs.
	ServerName string `json:"server_name,omitempty"`
	// Do not verify the endpoint's certificate at all.
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`
	// A PEM file of CA certificates to verify the endpoint with. Default: the
	// system's roots.
	CA string `json:"ca,omitempty"`
}

// check translates the fields into the core's configuration, checking what
// is the translation's to check (mode, what tcp mode excludes); the core's
// Config.Validate checks the values. It reads no file: loadCA does, at
// provision time.
func (c *HealthChecks) check(service string) (*discovery.HealthCheck, error) {
	errf := func(format string, args ...any) error {
		return fmt.Errorf("headless %s: health_checks: "+format, append([]any{service}, args...)...)
	}
	hc := &discovery.HealthCheck{
		Method: c.Method, URI: c.URI, Headers: c.Headers,
		Interval: time.Duration(c.Interval), Jitter: time.Duration(c.Jitter), Timeout: time.Duration(c.Timeout),
		Passes: c.Passes, Fails: c.Fails, Status: c.ExpectStatus, MaxInFlight: c.MaxInFlight,
		Optimistic: c.Optimistic, FailFast: c.FailFast,
	}
	switch c.Mode {
	case "", "http":
	case "tcp":
		hc.TCP = true
	default:
		return nil, errf("mode %q: use http or tcp", c.Mode)
	}
	switch {
	case c.Port < 0 || c.Port > 65535:
		return nil, errf("port %d out of range", c.Port)
	case hc.TCP && (c.URI != "" || c.Method != "" || c.ExpectBody != "" || c.ExpectStatus != 0 || len(c.Headers) > 0 || c.TLS != nil):
		return nil, errf("mode tcp only connects: uri, method, headers, expect_status, expect_body and tls do not apply")
	}
	hc.Port = uint16(c.Port)
	if c.ExpectBody != "" {
		re, err := regexp.Compile(c.ExpectBody)
		if err != nil {
			return nil, errf("expect_body: %v", err)
		}
		hc.Body = re
	}
	if t := c.TLS; t != nil {
		// Values only: the core builds the tls.Config and tells the
		// settings apart in the watcher's key.
		hc.TLS = &discovery.ProbeTLS{ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify}
	}
	return hc, nil
}

// loadCA reads the tls.ca file into cfg's health check (made by check from
// c) and has the core check it again with the file's contents; nothing to
// do without one. Its error names the option, the file and the Service.
func (c *HealthChecks) loadCA(service string, cfg *discovery.Config) error {
	if c == nil || c.TLS == nil || c.TLS.CA == "" || cfg.Health == nil || cfg.Health.TLS == nil {
		return nil
	}
	pem, err := os.ReadFile(c.TLS.CA)
	if err != nil {
		return fmt.Errorf("headless %s: health_tls_ca: %v", service, err)
	}
	cfg.Health.TLS.RootCAs = pem
	if err := cfg.Validate(); errors.Is(err, discovery.ErrNoPEMCertificate) {
		return fmt.Errorf("headless %s: health_tls_ca: no PEM certificate in %s", service, c.TLS.CA)
	} else if err != nil {
		return fmt.Errorf("headless %s: health_tls_ca %s: %v", service, c.TLS.CA, err)
	}
	return nil
}
