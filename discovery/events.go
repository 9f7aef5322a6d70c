package discovery

import (
	"slices"
	"sync"
)

// Users of Caddy react to its events (`healthy`, `unhealthy` from the
// active health checker) with handlers that page someone or run a script.
// A Watcher tells the configuration that uses it the same things about its
// endpoints, and when its endpoint set changes; the Caddy glue turns them
// into Caddy events. Like the logger, a shared Watcher tells only the newest
// configuration attached, so one change makes one event.

// Event names.
const (
	// EventHealthy: an endpoint that failed its health checks passes them
	// again (not an endpoint's first pass: Caddy's upstreams start healthy).
	EventHealthy = "healthy"
	// EventUnhealthy: an endpoint fails its health checks.
	EventUnhealthy = "unhealthy"
	// EventEndpointsChanged: DNS returned another set of endpoints.
	EventEndpointsChanged = "endpoints_changed"
)

// Event is one thing a Watcher tells its configuration.
type Event struct {
	Name    string
	Service Service
	// Endpoint is the endpoint a health event is about, `ip:port`.
	Endpoint string
	// Added and Removed list the endpoints of a change, sorted; Endpoints
	// is how many there are now.
	Added, Removed []string
	Endpoints      int
}

// listeners are the functions attached by AttachEvents, oldest first.
type listeners struct {
	mu   sync.Mutex
	fns  []*func(Event)
	last *func(Event) // the newest, called
}

// AttachEvents makes the Watcher call fn with its events until detach is
// called; of the attached functions the newest is called. fn runs on the
// Watcher's goroutines and must not block for long.
func (w *Watcher) AttachEvents(fn func(Event)) (detach func()) {
	l := &w.listeners
	p := &fn
	l.mu.Lock()
	l.fns = append(l.fns, p)
	l.last = p
	l.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			l.fns = slices.DeleteFunc(l.fns, func(q *func(Event)) bool { return q == p })
			l.last = nil
			if n := len(l.fns); n > 0 {
				l.last = l.fns[n-1]
			}
		})
	}
}

// emit calls the newest attached function, if any, with ev.
func (w *Watcher) emit(ev Event) {
	w.listeners.mu.Lock()
	fn := w.listeners.last
	w.listeners.mu.Unlock()
	if fn != nil {
		(*fn)(ev)
	}
}

// listened reports whether anyone listens.
func (w *Watcher) listened() bool {
	w.listeners.mu.Lock()
	defer w.listeners.mu.Unlock()
	return w.listeners.last != nil
}

// emitChange tells of the change from prev to s, if the endpoints differ.
func (w *Watcher) emitChange(prev, s *Snapshot) {
	if !w.listened() {
		return
	}
	var old []Endpoint
	if prev != nil {
		old = prev.Endpoints
	}
	if len(old) == len(s.Endpoints) && (len(old) == 0 || &old[0] == &s.Endpoints[0]) {
		return
	}
	added, removed := diff(old, s.Endpoints)
	if len(added) == 0 && len(removed) == 0 {
		return
	}
	w.emit(Event{Name: EventEndpointsChanged, Service: w.cfg.Service, Added: added, Removed: removed, Endpoints: len(s.Endpoints)})
}

// emitHealth tells of a probe that changed an endpoint's state from prev,
// as Caddy's checker would: healthy only back from unhealthy.
func (w *Watcher) emitHealth(ev CheckEvent, prev HealthState) {
	switch {
	case ev.State == Unhealthy:
		w.emit(Event{Name: EventUnhealthy, Service: ev.Service, Endpoint: ev.Endpoint.Dial})
	case ev.State == Healthy && prev == Unhealthy:
		w.emit(Event{Name: EventHealthy, Service: ev.Service, Endpoint: ev.Endpoint.Dial})
	}
}
