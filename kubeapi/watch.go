package kubeapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
)

// Event is one event of a watch stream. Type is ADDED, MODIFIED, DELETED or
// BOOKMARK (Object then carries only metadata.resourceVersion); ERROR
// events are returned by Stream.Next as an *APIError instead.
type Event struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

// Stream is an open watch: newline-delimited JSON events on one response.
type Stream struct {
	body    io.ReadCloser
	limited *limitedReader
	dec     *json.Decoder

	res       Resource
	namespace string
}

// maxEvent bounds one event: an EndpointSlice holds at most 1,000
// endpoints (about 300 KB of JSON).
const maxEvent = 16 << 20

// Watch opens a watch of res in namespace; query carries resourceVersion,
// labelSelector, allowWatchBookmarks, timeoutSeconds (watch=1 is added).
// The stream lasts until ctx ends, the apiserver ends it (timeoutSeconds),
// or the connection breaks: Next then returns an error. A 401 re-reads the
// token once. A refusal (403, 410 …) is an *APIError with verb "watch".
func (c *Client) Watch(ctx context.Context, res Resource, namespace, query string) (*Stream, error) {
	p := res.path(namespace, "") + "?watch=1"
	if query != "" {
		p += "&" + query
	}
	reread := false
	for {
		tok, err := c.token.Get(reread)
		if err != nil {
			return nil, fmt.Errorf("kubernetes: reading token_file: %w", err)
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.endpoint+p, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Accept", "application/json")
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := c.http.Do(req)
		if c.OnRequest != nil {
			code := 0
			if err == nil {
				code = resp.StatusCode
			}
			c.OnRequest("watch", res.Plural, code)
		}
		if err != nil {
			return nil, NoAnswer{fmt.Errorf("kubernetes: watch %s in namespace %q: apiserver %s did not answer: %w", res.Plural, namespace, c.endpoint, err)}
		}
		if resp.StatusCode == http.StatusUnauthorized && !reread && c.token.File != "" {
			resp.Body.Close()
			reread = true
			continue
		}
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			return nil, statusError(resp.StatusCode, b, "watch", res.Plural, "", namespace)
		}
		lr := &limitedReader{r: resp.Body}
		return &Stream{body: resp.Body, limited: lr, dec: json.NewDecoder(lr), res: res, namespace: namespace}, nil
	}
}

// Next returns the next event. An ERROR event is returned as an *APIError
// with the code of its Status (410 Gone: the resourceVersion is too old,
// list again); the end of the stream as io.EOF.
func (s *Stream) Next() (Event, error) {
	s.limited.n = 0
	var ev Event
	if err := s.dec.Decode(&ev); err != nil {
		if errors.Is(err, io.EOF) {
			return ev, io.EOF
		}
		return ev, NoAnswer{fmt.Errorf("kubernetes: watch %s in namespace %q: the stream broke: %w", s.res.Plural, s.namespace, err)}
	}
	switch ev.Type {
	case "ADDED", "MODIFIED", "DELETED", "BOOKMARK":
		return ev, nil
	case "ERROR":
		var st struct {
			Code    int
			Reason  string
			Message string
		}
		_ = json.Unmarshal(ev.Object, &st)
		if st.Code == 0 {
			st.Code = http.StatusInternalServerError
		}
		return ev, &APIError{Code: st.Code, Reason: st.Reason, Message: st.Message, Verb: "watch", Resource: s.res.Plural, Namespace: s.namespace}
	}
	return ev, fmt.Errorf("kubernetes: watch %s in namespace %q: unknown event type %q", s.res.Plural, s.namespace, ev.Type)
}

// Close ends the stream.
func (s *Stream) Close() error { return s.body.Close() }

// limitedReader fails once more than maxEvent bytes were read since n was
// last reset (at each event).
type limitedReader struct {
	r io.Reader
	n int
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n > maxEvent {
		return 0, fmt.Errorf("a watch event is larger than %d bytes", maxEvent)
	}
	n, err := l.r.Read(p)
	l.n += n
	return n, err
}
