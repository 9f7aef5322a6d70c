package kubestore

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// client is a small Kubernetes REST client: the handful of typed calls the
// storage needs (get, create, update, delete with preconditions, list by
// label) on Secrets and Leases of one namespace. Errors carry the apiserver's
// Status. No client-go: it would add ~25 MB to every Caddy binary.
type client struct {
	endpoint  string // https://host:port, no trailing slash
	namespace string
	http      *http.Client
	timeout   time.Duration // per request
	token     *tokenSource
}

// Resource kinds the storage uses.
var (
	secrets = resource{path: "/api/v1", plural: "secrets"}
	leases  = resource{path: "/apis/coordination.k8s.io/v1", plural: "leases"}
)

type resource struct{ path, plural string }

func newClient(endpoint, namespace, caFile, tokenFile string, timeout time.Duration) (*client, error) {
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || (u.Path != "" && u.Path != "/") {
		return nil, fmt.Errorf("endpoint %q: want https://host:port", endpoint)
	}
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file %s: no PEM certificate in it", caFile)
		}
		tlsConfig.RootCAs = pool
	}
	tok := &tokenSource{file: tokenFile}
	if tokenFile != "" {
		if _, err := tok.get(true); err != nil {
			return nil, fmt.Errorf("token_file: %w", err)
		}
	}
	tr := &http.Transport{
		TLSClientConfig:     tlsConfig,
		Proxy:               nil, // the apiserver is never reached through a proxy
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
		ForceAttemptHTTP2:   true,
	}
	return &client{
		endpoint:  strings.TrimSuffix(endpoint, "/"),
		namespace: namespace,
		http:      &http.Client{Transport: tr},
		timeout:   timeout,
		token:     tok,
	}, nil
}

// tokenSource re-reads the service-account token: bound tokens are rotated
// by the kubelet (about hourly), so a token read once goes stale.
type tokenSource struct {
	file string

	mu     sync.Mutex
	value  string
	readAt time.Time
}

const tokenMaxAge = time.Minute

func (t *tokenSource) get(force bool) (string, error) {
	if t.file == "" {
		return "", nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !force && t.value != "" && time.Since(t.readAt) < tokenMaxAge {
		return t.value, nil
	}
	b, err := os.ReadFile(t.file)
	if err != nil {
		return "", err
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("%s is empty", t.file)
	}
	t.value, t.readAt = v, time.Now()
	return v, nil
}

// APIError is an answer of the apiserver other than success, with the
// reason and message of its Status body.
type APIError struct {
	Code      int    // HTTP status
	Reason    string // Status.reason, e.g. Conflict, NotFound, Forbidden
	Message   string // Status.message
	Verb      string // get, list, create, update, delete
	Resource  string // secrets, leases
	Name      string // object name; empty for list
	Namespace string
}

func (e *APIError) Error() string {
	what := e.Resource
	if e.Name != "" {
		what += " " + e.Name
	}
	switch e.Code {
	case http.StatusForbidden:
		return fmt.Sprintf("kubernetes: %s %s in namespace %q refused (403 Forbidden): the service account needs RBAC permission to %q %q in %q (see the README's Role): %s",
			e.Verb, what, e.Namespace, e.Verb, e.Resource, e.Namespace, e.Message)
	case http.StatusUnauthorized:
		return fmt.Sprintf("kubernetes: %s %s in namespace %q: 401 Unauthorized: the token (token_file) was not accepted: %s", e.Verb, what, e.Namespace, e.Message)
	}
	return fmt.Sprintf("kubernetes: %s %s in namespace %q: %d %s: %s", e.Verb, what, e.Namespace, e.Code, e.Reason, e.Message)
}

func isCode(err error, code int) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == code
}

// noAnswer is a request the apiserver did not answer (unreachable, timed
// out, connection reset).
type noAnswer struct{ error }

func (e noAnswer) Unwrap() error { return e.error }

// transient reports whether asking again later may succeed: the apiserver
// did not answer, was overloaded (429) or failed (5xx). A refusal (401, 403,
// 422 …) stays a refusal.
func transient(err error) bool {
	var na noAnswer
	var ae *APIError
	switch {
	case errors.As(err, &na):
		return true
	case errors.As(err, &ae):
		return ae.Code == http.StatusTooManyRequests || ae.Code >= 500
	}
	return false
}

func isNotFound(err error) bool { return isCode(err, http.StatusNotFound) }
func isConflict(err error) bool { return isCode(err, http.StatusConflict) }

// do sends one request and decodes a 2xx answer into out. A 401 re-reads
// the token once and tries again (the token may have just rotated).
func (c *client) do(ctx context.Context, verb string, res resource, name, query string, body, out any) error {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return err
		}
	}
	p := res.path + "/namespaces/" + url.PathEscape(c.namespace) + "/" + res.plural
	if name != "" {
		p += "/" + url.PathEscape(name)
	}
	if query != "" {
		p += "?" + query
	}
	method := map[string]string{"get": http.MethodGet, "list": http.MethodGet, "create": http.MethodPost, "update": http.MethodPut, "delete": http.MethodDelete}[verb]
	reread, failures := false, 0
	for {
		tok, err := c.token.get(reread)
		if err != nil {
			return fmt.Errorf("kubernetes: reading token_file: %w", err)
		}
		status, respBody, err := c.send(ctx, method, p, tok, payload)
		countRequest(verb, res.plural, status)
		if err != nil {
			// Reads are safe to send again; a write may have been applied,
			// so its caller decides (every write carries a resourceVersion
			// or is a create, which answers 409 the second time).
			failures++
			if (verb == "get" || verb == "list") && failures < 3 && ctx.Err() == nil {
				select {
				case <-time.After(time.Duration(failures) * 200 * time.Millisecond):
					continue
				case <-ctx.Done():
				}
			}
			return noAnswer{fmt.Errorf("kubernetes: %s %s %s in namespace %q: apiserver %s did not answer: %w", verb, res.plural, name, c.namespace, c.endpoint, err)}
		}
		if status == http.StatusUnauthorized && !reread && c.token.file != "" {
			reread = true // the token may have just rotated
			continue
		}
		if status/100 != 2 {
			ae := &APIError{Code: status, Verb: verb, Resource: res.plural, Name: name, Namespace: c.namespace}
			var st struct{ Reason, Message string }
			if json.Unmarshal(respBody, &st) == nil && (st.Reason != "" || st.Message != "") {
				ae.Reason, ae.Message = st.Reason, st.Message
			} else {
				ae.Reason, ae.Message = http.StatusText(status), strings.TrimSpace(string(respBody))
			}
			return ae
		}
		if out == nil {
			return nil
		}
		if err := json.Unmarshal(respBody, out); err != nil {
			return fmt.Errorf("kubernetes: %s %s %s: decoding the answer: %w", verb, res.plural, name, err)
		}
		return nil
	}
}

// maxResponse bounds what is read of one answer: a Secret is at most 1 MiB
// of data (1.4 MiB base64), a list page of 100 of them more.
const maxResponse = 256 << 20

func (c *client) send(ctx context.Context, method, path, token string, payload []byte) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var body io.Reader
	if payload != nil {
		body = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.endpoint+path, body)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Accept", "application/json")
	if payload != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return 0, nil, err
	}
	return resp.StatusCode, b, nil
}

// objectMeta is the part of metadata the storage reads and writes.
type objectMeta struct {
	Name            string            `json:"name"`
	Namespace       string            `json:"namespace,omitempty"`
	UID             string            `json:"uid,omitempty"`
	ResourceVersion string            `json:"resourceVersion,omitempty"`
	Labels          map[string]string `json:"labels,omitempty"`
	Annotations     map[string]string `json:"annotations,omitempty"`
}

type secret struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   objectMeta        `json:"metadata"`
	Type       string            `json:"type,omitempty"`
	Data       map[string][]byte `json:"data,omitempty"`
}

type secretList struct {
	Metadata struct {
		Continue string `json:"continue"`
	} `json:"metadata"`
	Items []secret `json:"items"`
}

type lease struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   objectMeta `json:"metadata"`
	Spec       leaseSpec  `json:"spec"`
}

type leaseSpec struct {
	HolderIdentity       string `json:"holderIdentity,omitempty"`
	LeaseDurationSeconds int    `json:"leaseDurationSeconds,omitempty"`
	AcquireTime          string `json:"acquireTime,omitempty"` // RFC 3339 with microseconds (MicroTime)
	RenewTime            string `json:"renewTime,omitempty"`
	LeaseTransitions     int    `json:"leaseTransitions,omitempty"`
}

func (c *client) getSecret(ctx context.Context, name string) (*secret, error) {
	var s secret
	return &s, c.do(ctx, "get", secrets, name, "", nil, &s)
}

func (c *client) createSecret(ctx context.Context, s *secret) (*secret, error) {
	var out secret
	return &out, c.do(ctx, "create", secrets, "", "", s, &out)
}

func (c *client) updateSecret(ctx context.Context, s *secret) (*secret, error) {
	var out secret
	return &out, c.do(ctx, "update", secrets, s.Metadata.Name, "", s, &out)
}

// listSecrets returns every Secret matching the label selector, following
// continue tokens. Without resourceVersion the list is a quorum read.
func (c *client) listSecrets(ctx context.Context, selector string, limit int) ([]secret, error) {
	var all []secret
	cont := ""
	for {
		q := url.Values{"labelSelector": {selector}}
		if limit > 0 {
			q.Set("limit", fmt.Sprint(limit))
		} else {
			q.Set("limit", "100")
		}
		if cont != "" {
			q.Set("continue", cont)
		}
		var page secretList
		if err := c.do(ctx, "list", secrets, "", q.Encode(), nil, &page); err != nil {
			return nil, err
		}
		all = append(all, page.Items...)
		cont = page.Metadata.Continue
		if cont == "" || limit > 0 {
			return all, nil
		}
	}
}

// deleteOptions carries preconditions: the delete applies only to the object
// with this uid, and (if set) only at this resourceVersion.
func deleteOptions(uid, rv string) map[string]any {
	pre := map[string]string{}
	if uid != "" {
		pre["uid"] = uid
	}
	if rv != "" {
		pre["resourceVersion"] = rv
	}
	return map[string]any{"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": pre}
}

func (c *client) deleteSecret(ctx context.Context, name, uid string) error {
	return c.do(ctx, "delete", secrets, name, "", deleteOptions(uid, ""), nil)
}

func (c *client) getLease(ctx context.Context, name string) (*lease, error) {
	var l lease
	return &l, c.do(ctx, "get", leases, name, "", nil, &l)
}

func (c *client) createLease(ctx context.Context, l *lease) (*lease, error) {
	var out lease
	return &out, c.do(ctx, "create", leases, "", "", l, &out)
}

func (c *client) updateLease(ctx context.Context, l *lease) (*lease, error) {
	var out lease
	return &out, c.do(ctx, "update", leases, l.Metadata.Name, "", l, &out)
}

func (c *client) deleteLease(ctx context.Context, name, uid, rv string) error {
	return c.do(ctx, "delete", leases, name, "", deleteOptions(uid, rv), nil)
}
