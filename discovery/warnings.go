package discovery

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
)

// A DNS outage or a hostile server must not write a log line per lookup: a
// Watcher repeats a warning only when what it says changes, or warnRepeat
// after it last said it.

// warnRepeat is how often a warning that stays the same is repeated.
const warnRepeat = 30 * time.Second

// warnState remembers the last warning of one kind: what it was about
// and when it was written.
type warnState struct {
	what string
	at   time.Time
}

// warnings rate-limit the Watcher's repeated warnings: a DNS outage or a
// hostile server must not write a line per lookup.
type warnings struct {
	failure, bound, refused, partial warnState
}

// due reports whether a warning about what should be written now: when it
// differs from the last one of its kind, or warnRepeat after it.
func (warnings) due(st *warnState, what string, now time.Time) bool {
	if st.what == what && !st.at.IsZero() && now.Sub(st.at) < warnRepeat {
		return false
	}
	*st = warnState{what: what, at: now}
	return true
}

// failureKind is what makes two lookup failures the same for the logs: the
// outcome, the server and the name asked, not the text, which carries the
// ephemeral source port of every attempt.
func failureKind(err error) string {
	var le *LookupError
	if errors.As(err, &le) {
		return fmt.Sprintf("%s %s %d %s", le.Outcome, le.Server, le.Type, le.Name)
	}
	return err.Error()
}

// logRefused warns, once per change of the set, about endpoints the
// AddressPolicy refused, naming the records. An answer without refused
// addresses ends the set.
func (w *Watcher) logRefused(log *zap.Logger, res Result, now time.Time) {
	if res.RefusedCount == 0 {
		w.warned.refused = warnState{}
		return
	}
	names := make([]string, len(res.Refused))
	for i, r := range res.Refused {
		names[i] = r.String()
	}
	if w.warned.refused.what == strings.Join(names, " ") {
		return
	}
	w.warned.refused = warnState{what: strings.Join(names, " "), at: now}
	log.Warn("DNS answer names endpoint addresses that are not allowed; ignored them",
		zap.String("service", w.cfg.Service.String()), zap.Strings("refused", names),
		zap.Int("count", res.RefusedCount), zap.String("hint", w.cfg.Addresses.hint()))
}

// logPartial warns, at most every warnRepeat while it lasts, that one
// address family's question failed and the other's answer is used alone.
func (w *Watcher) logPartial(log *zap.Logger, res Result, now time.Time) {
	if res.Partial == nil {
		w.warned.partial = warnState{}
		return
	}
	if !w.warned.due(&w.warned.partial, failureKind(res.Partial), now) {
		return
	}
	failed, used, keep := "AAAA", "A", "ipv4"
	if failedFamily(res.Partial) == 4 {
		failed, used, keep = "A", "AAAA", "ipv6"
	}
	log.Warn(fmt.Sprintf("DNS refresh of %s records failed; using the %s records alone and asking %s again at every refresh", failed, used, failed),
		zap.String("service", w.cfg.Service.String()), zap.Int("endpoints", len(res.Endpoints)), zap.Error(res.Partial),
		zap.String("hint", fmt.Sprintf("if the Service has no %s addresses, set `versions %s` so that %s is not asked", failed, keep, failed)))
}

// failedFamily is the address family whose question err is about: 4 for A,
// 6 for AAAA.
func failedFamily(err error) family {
	var le *LookupError
	if errors.As(err, &le) && le.Type == dns.TypeA {
		return 4
	}
	return 6
}

// hasFamily reports whether s has endpoints of family f.
func hasFamily(s *Snapshot, f family) bool {
	if s == nil {
		return false
	}
	return slices.ContainsFunc(s.Endpoints, func(e Endpoint) bool { return e.IP.Is4() == (f == 4) })
}
