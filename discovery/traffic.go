package discovery

import (
	"sync/atomic"
)

// Which share of the requests each Service and each endpoint gets is what
// an operator moving traffic in steps checks after every step. The Watcher
// counts the requests it hands out (Candidates), for the whole Service and
// for each endpoint among the candidates; the counts of an endpoint are
// forgotten when it leaves DNS, so they take memory in proportion to the
// endpoints there are.

// traffic counts the requests handed out by one Watcher.
type traffic struct {
	requests    atomic.Uint64
	backup      atomic.Uint64 // of requests: handed out as a Split's backup
	backupInUse atomic.Bool   // a Split's last request went to this backup
	byEndpoint  atomic.Pointer[endpointCounts]
}

// endpointCounts are the counters of one set of endpoints, a snapshot's.
type endpointCounts struct {
	of []Endpoint // the Snapshot.Endpoints they were made for
	at map[string]int32
	n  []atomic.Uint64 // by at[dial]
}

// Traffic is what a Watcher has handed out since it started.
type Traffic struct {
	// Requests counts the requests given candidates of this Service
	// (retries included).
	Requests uint64
	// Backup counts those handed out while it stood in as a backup of a
	// Split; BackupInUse says the last such Split request went to it.
	Backup      uint64
	BackupInUse bool
	// ByEndpoint counts, for each endpoint DNS returns now, the requests
	// that had it among their candidates (with candidates sampling, a
	// request has several; with one candidate, or the first policy, it is
	// the request's endpoint unless that one was down).
	ByEndpoint map[string]uint64
}

// Traffic returns the counts.
func (w *Watcher) Traffic() Traffic {
	t := Traffic{
		Requests:    w.traffic.requests.Load(),
		Backup:      w.traffic.backup.Load(),
		BackupInUse: w.traffic.backupInUse.Load(),
		ByEndpoint:  map[string]uint64{},
	}
	if c := w.countsFor(w.snap.Load()); c != nil {
		for dial, i := range c.at {
			t.ByEndpoint[dial] = c.n[i].Load()
		}
	}
	return t
}

// count records one request handed eps.
func (w *Watcher) count(eps []Endpoint) {
	w.traffic.requests.Add(1)
	c := w.countsFor(w.snap.Load())
	if c == nil {
		return
	}
	for i := range eps {
		if j, ok := c.at[eps[i].Dial]; ok {
			c.n[j].Add(1)
		}
	}
}

// countsFor returns the counters of s's endpoints, made (once per DNS
// answer, keeping the counts of the endpoints that stay) if s is newer
// than the ones there are. An answer with the same endpoints keeps the
// counters themselves; one with other endpoints copies the counts of those
// that stay (requests counted on the old ones meanwhile, a few at most,
// are lost).
func (w *Watcher) countsFor(s *Snapshot) *endpointCounts {
	if s == nil || len(s.Endpoints) == 0 {
		return nil
	}
	old := w.traffic.byEndpoint.Load()
	if old != nil && len(old.of) == len(s.Endpoints) && &old.of[0] == &s.Endpoints[0] {
		return old
	}
	if old != nil && len(old.at) == len(s.Endpoints) && sameDials(old.at, s.Endpoints) {
		// The usual new answer: the same endpoints. Keep the counters.
		c := &endpointCounts{of: s.Endpoints, at: old.at, n: old.n}
		if w.traffic.byEndpoint.CompareAndSwap(old, c) {
			return c
		}
		return w.traffic.byEndpoint.Load()
	}
	c := &endpointCounts{of: s.Endpoints, at: make(map[string]int32, len(s.Endpoints)), n: make([]atomic.Uint64, len(s.Endpoints))}
	for i, e := range s.Endpoints {
		c.at[e.Dial] = int32(i)
		if old != nil {
			if j, ok := old.at[e.Dial]; ok {
				c.n[i].Store(old.n[j].Load()) // requests counted on old meanwhile are lost
			}
		}
	}
	if w.traffic.byEndpoint.CompareAndSwap(old, c) {
		return c
	}
	return w.traffic.byEndpoint.Load()
}

func sameDials(at map[string]int32, eps []Endpoint) bool {
	for _, e := range eps {
		if _, ok := at[e.Dial]; !ok {
			return false
		}
	}
	return true
}
