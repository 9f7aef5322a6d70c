package kubeapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/kubeapi"
	"github.com/caddy-headless/caddy-headless/kubeapi/apitest"
)

var slicesRes = kubeapi.Resource{Path: "/apis/discovery.k8s.io/v1", Plural: "endpointslices"}

// The watch decoder on the fake apiserver: events in order, a bookmark
// carries only the resourceVersion, a compacted version is an ERROR event
// that Next returns as a 410 (IsGone), a refused watch names the verb.
func TestWatchStream(t *testing.T) {
	fake := apitest.New(t, "bbs")
	c, err := kubeapi.New(fake.URL(), fake.CAFile, fake.TokenFile, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var list struct {
		Metadata struct{ ResourceVersion string }
	}
	q := url.Values{"labelSelector": {"kubernetes.io/service-name=web"}}
	if err := c.Do(ctx, "list", slicesRes, "bbs", "", q.Encode(), nil, &list); err != nil {
		t.Fatal(err)
	}
	q.Set("resourceVersion", list.Metadata.ResourceVersion)
	q.Set("allowWatchBookmarks", "true")
	st, err := c.Watch(ctx, slicesRes, "bbs", q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	fake.Apply("bbs", apitest.Slice("web-1", "web", "IPv4", nil, apitest.Ready("10.0.0.1")))
	fake.Apply("bbs", apitest.Slice("other", "other", "IPv4", nil, apitest.Ready("10.0.0.9"))) // not selected
	fake.Bookmark()
	ev, err := st.Next()
	if err != nil || ev.Type != "ADDED" || !strings.Contains(string(ev.Object), "10.0.0.1") {
		t.Fatalf("first event %s %s, %v", ev.Type, ev.Object, err)
	}
	ev, err = st.Next()
	var meta struct {
		Metadata struct{ ResourceVersion string }
	}
	if err != nil || ev.Type != "BOOKMARK" || json.Unmarshal(ev.Object, &meta) != nil || meta.Metadata.ResourceVersion != fake.ResourceVersion() {
		t.Fatalf("second event %s %s, %v: want the bookmark at %s", ev.Type, ev.Object, err, fake.ResourceVersion())
	}
	fake.EndStreams()
	if _, err := st.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the apiserver ended the stream: %v, want io.EOF", err)
	}
	st.Close()

	fake.Compact()
	st, err = c.Watch(ctx, slicesRes, "bbs", q.Encode()) // from the list's, now compacted, version
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Next(); !kubeapi.IsGone(err) || kubeapi.Transient(err) {
		t.Fatalf("watch from a compacted version: %v, want a 410 that is not transient", err)
	}

	fake.Deny("watch", "bbs")
	_, err = c.Watch(ctx, slicesRes, "bbs", q.Encode())
	for _, want := range []string{"403", `"watch"`, `"endpointslices"`, `"bbs"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("refused watch: %v; want an error naming %s", err, want)
		}
	}
}
