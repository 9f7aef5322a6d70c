package kubestore

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"github.com/caddy-headless/caddy-headless/kubeapi"
)

// client is the storage's view of the shared apiserver client (package
// kubeapi): the handful of typed calls the storage needs (get, create,
// update, delete with preconditions, list by label) on Secrets and Leases
// of one namespace. Errors carry the apiserver's Status.
type client struct {
	api       *kubeapi.Client
	namespace string
}

// Resource kinds the storage uses.
var (
	secrets = resource{Path: "/api/v1", Plural: "secrets"}
	leases  = resource{Path: "/apis/coordination.k8s.io/v1", Plural: "leases"}
)

type resource = kubeapi.Resource

func newClient(endpoint, namespace, caFile, tokenFile string, timeout time.Duration) (*client, error) {
	api, err := kubeapi.New(endpoint, caFile, tokenFile, timeout)
	if err != nil {
		return nil, err
	}
	api.OnRequest = countRequest
	return &client{api: api, namespace: namespace}, nil
}

// APIError is an answer of the apiserver other than success, with the
// reason and message of its Status body.
type APIError = kubeapi.APIError

// transient reports whether asking again later may succeed (kubeapi.Transient).
func transient(err error) bool { return kubeapi.Transient(err) }

func isNotFound(err error) bool { return kubeapi.IsNotFound(err) }
func isConflict(err error) bool { return kubeapi.IsConflict(err) }

// do sends one request about res in the storage's namespace (kubeapi.Client.Do).
func (c *client) do(ctx context.Context, verb string, res resource, name, query string, body, out any) error {
	return c.api.Do(ctx, verb, res, c.namespace, name, query, body, out)
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
