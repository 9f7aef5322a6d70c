package discovery

import "go.uber.org/zap"

// What only the tests use, kept out of the package's API.

// Start creates a Watcher for cfg and begins resolving at once (New, then
// Run).
func Start(cfg Config, logger *zap.Logger) *Watcher {
	w := New(cfg, logger)
	w.Run()
	return w
}

// Stats returns a copy of the Watcher's counters (Status carries them too).
func (w *Watcher) Stats() Stats { return w.stats.copy() }

// Transient reports whether the outcome says nothing about the Service (the
// server could not answer), so the last good endpoint set is kept.
func (o Outcome) Transient() bool {
	return o != OutcomeSuccess && o != OutcomeNXDomain && o != OutcomeNoData
}

// Health returns the state of the endpoint dialed at dial, and whether the
// prober knows it (Status tells the same of a Snapshot's endpoints).
func (p *prober) Health(dial string) (EndpointHealth, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	st, ok := p.states[dial]
	if !ok {
		return EndpointHealth{}, false
	}
	return st.EndpointHealth, true
}
