package discovery

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Moving an application from VMs into pods means two Services and a share
// of the requests that moves from one to the other in steps. A Split sends
// each request to one Service, drawn by weight among those that have a
// usable endpoint, and hands the request candidates of that Service only:
// the request path costs the same for 1 and 1,000 endpoints, and a
// Service's share is spread over its own endpoints (the one VM of a
// Service weighted 90 gets 90%, however many pods the other has).
//
// Which endpoints of the chosen Service are candidates is the Watcher's
// business (Candidates); the Split only decides which Service.

// SplitMember is one Service of a Split.
type SplitMember struct {
	Watcher *Watcher
	// Weight is the Service's share relative to the others; 0 makes it a
	// backup, used only while no weighted Service has a usable endpoint.
	// Ignored when the Split is ByEndpoints.
	Weight int
	// Sampler picks the request's candidates among the Service's endpoints
	// (nil: all of them).
	Sampler *Sampler
}

// Split sends each request to one of several Services.
type Split struct {
	// Members in the order of the config: backups are tried in this order.
	Members []SplitMember
	// ByEndpoints weighs each Service by the number of its usable endpoints
	// (the weights are not given): every endpoint of every Service then gets
	// the same share, as if they were one Service.
	ByEndpoints bool
}

// maxSplitMembers bounds the Services of one Split (the config checks it),
// so that the request path draws without allocating.
const maxSplitMembers = 16

// MaxSplitServices is the most Services one Split may hold.
const MaxSplitServices = maxSplitMembers

// usable is how many endpoints of w a request may go to without failing
// open: those DNS returns, and of them those passing health checks if there
// are checks. 0 before the first answer: until then the others serve. O(1).
func (w *Watcher) usable() int {
	s := w.snap.Load()
	if s == nil {
		w.Run() // a request before the config started (Run is once)
		return 0
	}
	n := len(s.Endpoints)
	if n > 0 && w.prober != nil {
		n = min(n, len(w.prober.View().Eligible))
	}
	return n
}

// Pick returns the index of the Service a request drawn at u (in [0,1))
// goes to, and whether it is a backup; -1 if no Service has a usable
// endpoint. The weighted Services with a usable endpoint share [0,1) in the
// order of Members, each in proportion to its weight: the same u stays on
// the same Service while the weights and the usable Services stay, and when
// the last Service's weight grows, the u that were on it stay on it.
func (sp *Split) Pick(u float64) (int, bool) {
	var weights [maxSplitMembers]int
	total := 0
	for i := range sp.Members {
		m := &sp.Members[i]
		n := m.Watcher.usable()
		switch {
		case n == 0:
		case sp.ByEndpoints:
			weights[i] = n
		default:
			weights[i] = m.Weight
		}
		total += weights[i]
	}
	if total == 0 {
		for i := range sp.Members {
			if m := &sp.Members[i]; !sp.ByEndpoints && m.Weight == 0 && m.Watcher.usable() > 0 {
				return i, true
			}
		}
		return -1, false
	}
	x := int(u * float64(total))
	for i, wt := range weights[:len(sp.Members)] {
		if x < wt {
			return i, false
		}
		x -= wt
	}
	// u rounded up to 1: the last weighted one.
	for i := len(sp.Members) - 1; i >= 0; i-- {
		if weights[i] > 0 {
			return i, false
		}
	}
	return -1, false
}

// Candidates returns the endpoints a request drawn at u may go to: some of
// the endpoints of the one Service that Pick chooses, or of the Service
// prefer if it is a usable weighted one (a sticky client's: see Holding;
// -1 for none). A retry (retry true)
// is handed every usable endpoint of every weighted Service, or of every
// backup in use, so that it may go to another Service than the try before.
// When no Service has a usable endpoint, the first one (in order) that
// hands out any endpoint at all serves (failing open, as one Service does);
// the error names every Service otherwise.
func (sp *Split) Candidates(ctx context.Context, u float64, prefer int, retry bool) ([]Endpoint, error) {
	i, backup := sp.Pick(u)
	if prefer >= 0 && prefer < len(sp.Members) && !backup && sp.Members[prefer].Watcher.usable() > 0 &&
		(sp.ByEndpoints || sp.Members[prefer].Weight > 0) {
		i = prefer
	}
	if i < 0 {
		return sp.failOpen(ctx)
	}
	sp.markBackups(i, backup)
	if retry {
		return sp.all(ctx, backup)
	}
	m := &sp.Members[i]
	if backup {
		m.Watcher.traffic.backup.Add(1)
	}
	return m.Watcher.Candidates(ctx, m.Sampler)
}

// markBackups records which backup is in use (i if backup, none if not),
// writing only on a change: the request path must not contend on it.
func (sp *Split) markBackups(i int, backup bool) {
	if sp.ByEndpoints {
		return
	}
	for j := range sp.Members {
		m := &sp.Members[j]
		if m.Weight != 0 {
			continue
		}
		inUse := backup && j == i
		if m.Watcher.traffic.backupInUse.Load() != inUse {
			m.Watcher.traffic.backupInUse.Store(inUse)
		}
	}
}

// all returns every usable endpoint of the weighted Services (backups: of
// the first backup in use), for a retry.
func (sp *Split) all(ctx context.Context, backup bool) ([]Endpoint, error) {
	var out []Endpoint
	var errs []error
	for i := range sp.Members {
		m := &sp.Members[i]
		if m.Watcher.usable() == 0 || !sp.ByEndpoints && (m.Weight == 0) != backup {
			continue
		}
		eps, err := m.Watcher.Candidates(ctx, nil)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, eps...)
		if backup {
			break
		}
	}
	if len(out) == 0 {
		return nil, sp.noneError(errs)
	}
	return out, nil
}

// failOpen serves from the first Service that hands out any endpoint.
func (sp *Split) failOpen(ctx context.Context) ([]Endpoint, error) {
	var errs []error
	for i := range sp.Members {
		m := &sp.Members[i]
		eps, err := m.Watcher.Candidates(ctx, m.Sampler)
		if err == nil && len(eps) > 0 {
			return eps, nil
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return nil, sp.noneError(errs)
}

func (sp *Split) noneError(errs []error) error {
	names := make([]string, len(sp.Members))
	for i, m := range sp.Members {
		names[i] = m.Watcher.cfg.Service.String()
	}
	err := errors.Join(errs...)
	if err == nil {
		err = ErrNoneHealthy
	}
	return fmt.Errorf("none of the Services %s has an endpoint for this request: %w", strings.Join(names, ", "), err)
}

// Holding returns the index of the Service that has an endpoint for which
// match is true among those DNS returns now, -1 if none: a sticky cookie
// names an endpoint, and its client stays with that endpoint's Service.
// O(endpoints), as the cookie policy's own search is.
func (sp *Split) Holding(match func(dial string) bool) int {
	for i := range sp.Members {
		s := sp.Members[i].Watcher.snap.Load()
		if s == nil {
			continue
		}
		for _, e := range s.Endpoints {
			if match(e.Dial) {
				return i
			}
		}
	}
	return -1
}
