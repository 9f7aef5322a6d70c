package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The "VMs" are network namespaces named nsPrefix+<name>, each joined to the
// host by a veth pair (ifPrefix+<n> on the host side), with 10.231.<n>.2/24
// and fd00:231:0:<n>::2/64; the host side has .1 and ::1. Everything the
// suite creates carries these prefixes, so leftovers of a crashed run can be
// found and removed.
const (
	nsPrefix = "chl-"
	ifPrefix = "chlh"
	numVMs   = 6
)

// vmPorts are the ports every VM serves its HTTP reply on.
var vmPorts = []int{8001, 8004, 8080, 5432}

type vm struct {
	name   string // vm1 …
	n      int
	ns     string
	hostIf string
	v4, v6 string
	proc   *process
}

func (s *suite) startVMs() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	for n := 1; n <= numVMs; n++ {
		v := &vm{
			name:   fmt.Sprintf("vm%d", n),
			n:      n,
			ns:     fmt.Sprintf("%svm%d", nsPrefix, n),
			hostIf: fmt.Sprintf("%s%d", ifPrefix, n),
			v4:     fmt.Sprintf("10.231.%d.2", n),
			v6:     fmt.Sprintf("fd00:231:0:%d::2", n),
		}
		peer := fmt.Sprintf("chlv%d", n)
		cmds := [][]string{
			{"netns", "add", v.ns},
			{"link", "add", v.hostIf, "type", "veth", "peer", "name", peer, "netns", v.ns},
			{"addr", "add", fmt.Sprintf("10.231.%d.1/24", n), "dev", v.hostIf},
			{"-6", "addr", "add", fmt.Sprintf("fd00:231:0:%d::1/64", n), "dev", v.hostIf, "nodad"},
			{"link", "set", v.hostIf, "up"},
			{"-n", v.ns, "link", "set", "lo", "up"},
			{"-n", v.ns, "addr", "add", v.v4 + "/24", "dev", peer},
			{"-n", v.ns, "-6", "addr", "add", v.v6 + "/64", "dev", peer, "nodad"},
			{"-n", v.ns, "link", "set", peer, "up"},
		}
		s.vms = append(s.vms, v)
		for _, c := range cmds {
			if _, err := run("ip", c...); err != nil {
				return err
			}
		}
		v.proc, err = startProcess(s.dir, v.name, []string{"E2E_VM_NAME=" + v.name},
			"ip", "netns", "exec", v.ns, self, "-test.run=^$")
		if err != nil {
			return err
		}
		for _, addr := range []string{v.v4, v.v6} {
			if err := v.checkRoute(addr); err != nil {
				return err
			}
			url := fmt.Sprintf("http://%s/ready", net.JoinHostPort(addr, "8080"))
			if err := waitFor(20*time.Second, 100*time.Millisecond, func() error {
				if v.proc.exited() {
					return fmt.Errorf("%s's server exited: %v\n%s", v.name, v.proc.Err(), v.proc.tail(20))
				}
				return httpOK(http.DefaultClient, url, "")
			}); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkRoute asserts that traffic to addr leaves through this VM's veth, so
// the suite never sends anything anywhere but to its own namespaces.
func (v *vm) checkRoute(addr string) error {
	out, err := run("ip", "route", "get", addr)
	if err != nil {
		return err
	}
	if !strings.Contains(" "+strings.Join(strings.Fields(out), " ")+" ", " dev "+v.hostIf+" ") {
		return fmt.Errorf("route to %s does not go through the suite's veth %s: %s", addr, v.hostIf, strings.TrimSpace(out))
	}
	return nil
}

func (v *vm) stop() {
	if v.proc != nil {
		v.proc.stop()
	}
}

// useVMs returns the VMs with the given numbers after asserting that their
// addresses are routed through the suite's veths.
func (s *suite) useVMs(t *testing.T, ns ...int) []*vm {
	t.Helper()
	var out []*vm
	for _, n := range ns {
		v := s.vms[n-1]
		for _, a := range []string{v.v4, v.v6} {
			if err := v.checkRoute(a); err != nil {
				t.Fatal(err)
			}
		}
		out = append(out, v)
	}
	return out
}

// cleanupNetns removes every namespace and host interface with the suite's
// prefixes, ending the processes still running in those namespaces.
func cleanupNetns() {
	out, _ := run("ip", "netns", "list")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], nsPrefix) {
			continue
		}
		pids, _ := run("ip", "netns", "pids", f[0])
		for _, p := range strings.Fields(pids) {
			_, _ = run("kill", "-9", p)
		}
		_, _ = run("ip", "netns", "del", f[0])
	}
	out, _ = run("ip", "-o", "link", "show")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if strings.HasPrefix(name, ifPrefix) {
			_, _ = run("ip", "link", "del", name)
		}
	}
}

// vmReply is what a VM answers: who it is and what it received.
type vmReply struct {
	VM             string `json:"vm"`
	Path           string `json:"path"`
	Local          string `json:"local"` // the address the request arrived at
	Host           string `json:"host"`
	XForwardedFor  string `json:"x_forwarded_for"`
	XRealIP        string `json:"x_real_ip"`
	XForwardedHost string `json:"x_forwarded_host"`
	XForwardedProt string `json:"x_forwarded_proto"`
}

// runVMServer is the HTTP server of a VM: the test binary re-executed inside
// the VM's namespace with E2E_VM_NAME set.
func runVMServer(name string) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// ?sleep=<duration> makes a slow request (one still in flight
		// when Caddy is told to stop).
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil && d > 0 && d <= time.Minute {
			time.Sleep(d)
		}
		local := ""
		if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			local = a.String()
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(vmReply{
			VM:             name,
			Path:           r.URL.Path,
			Local:          local,
			Host:           r.Host,
			XForwardedFor:  r.Header.Get("X-Forwarded-For"),
			XRealIP:        r.Header.Get("X-Real-IP"),
			XForwardedHost: r.Header.Get("X-Forwarded-Host"),
			XForwardedProt: r.Header.Get("X-Forwarded-Proto"),
		})
	})
	ports := vmPorts
	if list := os.Getenv("E2E_VM_PORTS"); list != "" { // a "pod" on ports of its own
		ports = nil
		for _, f := range strings.Fields(list) {
			p, err := strconv.Atoi(f)
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: E2E_VM_PORTS: %v\n", name, err)
				os.Exit(1)
			}
			ports = append(ports, p)
		}
	}
	errc := make(chan error, len(ports))
	for _, p := range ports {
		go func() { errc <- http.ListenAndServe(fmt.Sprintf(":%d", p), h) }()
	}
	fmt.Fprintf(os.Stderr, "%s: %v\n", name, <-errc)
	os.Exit(1)
}

func sortedKeys(m map[string]int) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
