package kubeapi

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

// Client sends requests to one apiserver. Its zero value is not usable:
// make one with New.
type Client struct {
	endpoint string // https://host:port, no trailing slash
	http     *http.Client
	timeout  time.Duration // per request (not per watch stream)
	token    *TokenSource

	// OnRequest, if set, is called after every answer (code 0: none) of
	// Do, for metrics. Set it before the first request.
	OnRequest func(verb, resource string, code int)
}

// Resource is a kind of namespaced object: its API group path and plural.
type Resource struct{ Path, Plural string }

// New makes a client of the apiserver at endpoint (https://host:port),
// trusting the CA in caFile (empty: the system's roots) and sending the
// token in tokenFile (empty: none). It reads both files once, so that a
// wrong path is reported at once, and contacts nothing.
func New(endpoint, caFile, tokenFile string, timeout time.Duration) (*Client, error) {
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
	tok := &TokenSource{File: tokenFile}
	if tokenFile != "" {
		if _, err := tok.Get(true); err != nil {
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
	return &Client{
		endpoint: strings.TrimSuffix(endpoint, "/"),
		http:     &http.Client{Transport: tr},
		timeout:  timeout,
		token:    tok,
	}, nil
}

// Endpoint is the apiserver's URL, as errors name it.
func (c *Client) Endpoint() string { return c.endpoint }

// CloseIdleConnections closes the connections kept for later requests.
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }

// TokenSource re-reads the service-account token: bound tokens are rotated
// by the kubelet (about hourly), so a token read once goes stale.
type TokenSource struct {
	File string

	mu     sync.Mutex
	value  string
	readAt time.Time
}

// TokenMaxAge is how long a token read from its file is used before the
// file is read again.
const TokenMaxAge = time.Minute

// Get returns the token, read again from the file if force is set or the
// one read last is older than TokenMaxAge. Without a file it returns "".
func (t *TokenSource) Get(force bool) (string, error) {
	if t.File == "" {
		return "", nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !force && t.value != "" && time.Since(t.readAt) < TokenMaxAge {
		return t.value, nil
	}
	b, err := os.ReadFile(t.File)
	if err != nil {
		return "", err
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("%s is empty", t.File)
	}
	t.value, t.readAt = v, time.Now()
	return v, nil
}

// APIError is an answer of the apiserver other than success, with the
// reason and message of its Status body.
type APIError struct {
	Code      int    // HTTP status
	Reason    string // Status.reason, e.g. Conflict, NotFound, Forbidden, Expired
	Message   string // Status.message
	Verb      string // get, list, watch, create, update, delete
	Resource  string // secrets, leases, endpointslices
	Name      string // object name; empty for list and watch
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

// IsCode reports whether err is an APIError with that HTTP status.
func IsCode(err error, code int) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == code
}

// IsNotFound reports a 404.
func IsNotFound(err error) bool { return IsCode(err, http.StatusNotFound) }

// IsConflict reports a 409.
func IsConflict(err error) bool { return IsCode(err, http.StatusConflict) }

// IsGone reports a 410: the resourceVersion a watch asked for is too old,
// list again.
func IsGone(err error) bool { return IsCode(err, http.StatusGone) }

// NoAnswer is a request the apiserver did not answer (unreachable, timed
// out, connection reset).
type NoAnswer struct{ Err error }

func (e NoAnswer) Error() string { return e.Err.Error() }
func (e NoAnswer) Unwrap() error { return e.Err }

// Transient reports whether asking again later may succeed: the apiserver
// did not answer, was overloaded (429) or failed (5xx). A refusal (401, 403,
// 422 …) stays a refusal.
func Transient(err error) bool {
	var na NoAnswer
	var ae *APIError
	switch {
	case errors.As(err, &na):
		return true
	case errors.As(err, &ae):
		return ae.Code == http.StatusTooManyRequests || ae.Code >= 500
	}
	return false
}

// path is the URL path of res in namespace, of one object if name is set.
func (res Resource) path(namespace, name string) string {
	p := res.Path + "/namespaces/" + url.PathEscape(namespace) + "/" + res.Plural
	if name != "" {
		p += "/" + url.PathEscape(name)
	}
	return p
}

// Do sends one request (verb: get, list, create, update, delete) about res
// in namespace and decodes a 2xx answer into out. A 401 re-reads the token
// once and tries again (the token may have just rotated); reads the
// apiserver did not answer are sent again twice.
func (c *Client) Do(ctx context.Context, verb string, res Resource, namespace, name, query string, body, out any) error {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return err
		}
	}
	p := res.path(namespace, name)
	if query != "" {
		p += "?" + query
	}
	method := map[string]string{"get": http.MethodGet, "list": http.MethodGet, "create": http.MethodPost, "update": http.MethodPut, "delete": http.MethodDelete}[verb]
	reread, failures := false, 0
	for {
		tok, err := c.token.Get(reread)
		if err != nil {
			return fmt.Errorf("kubernetes: reading token_file: %w", err)
		}
		status, respBody, err := c.send(ctx, method, p, tok, payload)
		if c.OnRequest != nil {
			c.OnRequest(verb, res.Plural, status)
		}
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
			return NoAnswer{fmt.Errorf("kubernetes: %s %s %s in namespace %q: apiserver %s did not answer: %w", verb, res.Plural, name, namespace, c.endpoint, err)}
		}
		if status == http.StatusUnauthorized && !reread && c.token.File != "" {
			reread = true // the token may have just rotated
			continue
		}
		if status/100 != 2 {
			return statusError(status, respBody, verb, res.Plural, name, namespace)
		}
		if out == nil {
			return nil
		}
		if err := json.Unmarshal(respBody, out); err != nil {
			return fmt.Errorf("kubernetes: %s %s %s: decoding the answer: %w", verb, res.Plural, name, err)
		}
		return nil
	}
}

// statusError makes the APIError of a non-2xx answer from its Status body.
func statusError(code int, body []byte, verb, resource, name, namespace string) *APIError {
	ae := &APIError{Code: code, Verb: verb, Resource: resource, Name: name, Namespace: namespace}
	var st struct{ Reason, Message string }
	if json.Unmarshal(body, &st) == nil && (st.Reason != "" || st.Message != "") {
		ae.Reason, ae.Message = st.Reason, st.Message
	} else {
		ae.Reason, ae.Message = http.StatusText(code), strings.TrimSpace(string(body))
	}
	return ae
}

// maxResponse bounds what is read of one answer: a Secret is at most 1 MiB
// of data (1.4 MiB base64), a list page of 100 of them more.
const maxResponse = 256 << 20

func (c *Client) send(ctx context.Context, method, path, token string, payload []byte) (int, []byte, error) {
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
