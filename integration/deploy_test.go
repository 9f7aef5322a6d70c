package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// The deploy/ manifests against the suite's real kube-apiserver. There is no
// kubelet, scheduler or controller-manager here: nothing runs a pod, so what
// is checked is what the API server decides (schema, admission, Pod
// Security, RBAC) and, in TestDeployPods, the image's binary run the way a
// pod would run it. deploy/README.md lists what that cannot prove.

// deployNS is the namespace of deploy/base.
const deployNS = "caddy-system"

// kustomizations are deploy/base and its overlays, applied in this order:
// the example last, since TestDeployPods runs its ConfigMap.
var kustomizations = []string{"base", "overlays/hostnetwork", "overlays/example"}

func deployDir(k string) string { return filepath.Join("..", "deploy", filepath.FromSlash(k)) }

func (s *suite) kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := run(s.tool("kubectl"), append([]string{"--kubeconfig", s.kubeconfig}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// The example overlay's Caddyfile.example is a copy (kustomize reads files
// only below the kustomization): it must stay the project's.
func TestDeployExampleIsCaddyfileExample(t *testing.T) {
	want, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(deployDir("overlays/example"), "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("deploy/overlays/example/Caddyfile.example differs from Caddyfile.example: cp Caddyfile.example deploy/overlays/example/")
	}
}

// The parts of the objects the checks read.
type (
	labelSelector struct {
		MatchLabels map[string]string `json:"matchLabels"`
	}
	probe struct {
		HTTPGet *struct {
			Path string `json:"path"`
			Port any    `json:"port"`
		} `json:"httpGet"`
	}
	containerPort struct {
		Name          string `json:"name"`
		ContainerPort int    `json:"containerPort"`
		Protocol      string `json:"protocol"`
	}
	container struct {
		Name            string          `json:"name"`
		Ports           []containerPort `json:"ports"`
		StartupProbe    *probe          `json:"startupProbe"`
		ReadinessProbe  *probe          `json:"readinessProbe"`
		LivenessProbe   *probe          `json:"livenessProbe"`
		SecurityContext struct {
			Capabilities struct {
				Add  []string `json:"add"`
				Drop []string `json:"drop"`
			} `json:"capabilities"`
		} `json:"securityContext"`
		VolumeMounts []struct {
			Name      string `json:"name"`
			MountPath string `json:"mountPath"`
			SubPath   string `json:"subPath"`
		} `json:"volumeMounts"`
	}
	podSpec struct {
		HostNetwork                   bool        `json:"hostNetwork"`
		DNSPolicy                     string      `json:"dnsPolicy"`
		TerminationGracePeriodSeconds int         `json:"terminationGracePeriodSeconds"`
		Containers                    []container `json:"containers"`
		SecurityContext               struct {
			Sysctls []struct {
				Name string `json:"name"`
			} `json:"sysctls"`
		} `json:"securityContext"`
		Volumes []struct {
			Name      string `json:"name"`
			ConfigMap *struct {
				Name string `json:"name"`
			} `json:"configMap"`
		} `json:"volumes"`
	}
	deploymentObj struct {
		Spec struct {
			Selector labelSelector `json:"selector"`
			Template struct {
				Metadata struct {
					Labels map[string]string `json:"labels"`
				} `json:"metadata"`
				Spec podSpec `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	serviceObj struct {
		Spec struct {
			Type                  string            `json:"type"`
			ExternalTrafficPolicy string            `json:"externalTrafficPolicy"`
			Selector              map[string]string `json:"selector"`
			Ports                 []struct {
				Port       int    `json:"port"`
				TargetPort any    `json:"targetPort"`
				Protocol   string `json:"protocol"`
			} `json:"ports"`
		} `json:"spec"`
	}
	pdbObj struct {
		Spec struct {
			Selector labelSelector `json:"selector"`
		} `json:"spec"`
	}
)

func (s *suite) getJSON(t *testing.T, into any, args ...string) {
	t.Helper()
	out := s.kubectl(t, append([]string{"-n", deployNS, "get", "-o", "json"}, args...)...)
	if err := json.Unmarshal([]byte(out), into); err != nil {
		t.Fatalf("kubectl get %v: %v\n%s", args, err, out)
	}
}

// subset fails unless every label of sel is on labels.
func subset(t *testing.T, what string, sel, labels map[string]string) {
	t.Helper()
	if len(sel) == 0 {
		t.Errorf("%s: empty selector", what)
	}
	for k, v := range sel {
		if labels[k] != v {
			t.Errorf("%s selects %s=%s, the pod template has %s=%q", what, k, v, k, labels[k])
		}
	}
}

// portOf resolves a probe's or a Service's port (a number or a container
// port's name) to a container port.
func portOf(t *testing.T, c container, p any, proto string) int {
	t.Helper()
	switch v := p.(type) {
	case float64:
		return int(v)
	case string:
		for _, cp := range c.Ports {
			if cp.Name == v && (cp.Protocol == proto || proto == "") {
				return cp.ContainerPort
			}
		}
	}
	t.Errorf("port %v (%s) is not a port of container %s", p, proto, c.Name)
	return 0
}

// adapted is what the checks read of Caddy's JSON config.
type adapted struct {
	Apps struct {
		HTTP struct {
			GracePeriod   int64 `json:"grace_period"`
			ShutdownDelay int64 `json:"shutdown_delay"`
			Servers       map[string]struct {
				Listen []string `json:"listen"`
			} `json:"servers"`
		} `json:"http"`
	} `json:"apps"`
	Storage struct {
		Module string `json:"module"`
	} `json:"storage"`
	Admin struct {
		Listen string `json:"listen"`
	} `json:"admin"`
}

// adaptConfigMap writes the ConfigMap's files to a directory, as the
// kubelet mounts them at /etc/caddy, and adapts its Caddyfile with the
// suite's Caddy.
func (s *suite) adaptConfigMap(t *testing.T, data map[string]string) (dir string, cfg adapted) {
	t.Helper()
	dir = t.TempDir()
	for name, body := range data {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := run(s.caddyBin, "adapt", "--config", filepath.Join(dir, "Caddyfile"))
	if err != nil {
		t.Fatalf("the ConfigMap's Caddyfile does not adapt: %v", err)
	}
	if err := json.Unmarshal([]byte(out), &cfg); err != nil {
		t.Fatalf("caddy adapt: %v\n%s", err, out)
	}
	return dir, cfg
}

func (cfg adapted) listens(port int) bool {
	for _, srv := range cfg.Apps.HTTP.Servers {
		for _, l := range srv.Listen {
			if strings.HasSuffix(l, fmt.Sprintf(":%d", port)) {
				return true
			}
		}
	}
	return false
}

// TestDeployManifests applies deploy/base and each overlay: a server-side
// dry run with strict schema validation, then for real, and reads the
// objects back to check that they fit together.
func TestDeployManifests(t *testing.T) {
	s := requireSuite(t)
	for _, k := range kustomizations {
		t.Run(strings.ReplaceAll(k, "/", "_"), func(t *testing.T) {
			dir := deployDir(k)
			// A server-side dry run creates nothing, so the objects that
			// go in the Namespace need it to exist already: plain, the
			// real apply gives it its labels.
			s.namespace(t, deployNS)
			s.kubectl(t, "apply", "-k", dir, "--dry-run=server", "--validate=strict")
			s.kubectl(t, "apply", "-k", dir, "--validate=strict")

			var d deploymentObj
			s.getJSON(t, &d, "deployment", "caddy")
			pod := d.Spec.Template.Spec
			labels := d.Spec.Template.Metadata.Labels
			subset(t, "the Deployment", d.Spec.Selector.MatchLabels, labels)
			var svc serviceObj
			s.getJSON(t, &svc, "service", "caddy")
			subset(t, "the Service", svc.Spec.Selector, labels)
			var pdb pdbObj
			s.getJSON(t, &pdb, "poddisruptionbudget", "caddy")
			subset(t, "the PodDisruptionBudget", pdb.Spec.Selector.MatchLabels, labels)
			if svc.Spec.Type != "LoadBalancer" || svc.Spec.ExternalTrafficPolicy != "Local" {
				t.Errorf("Service type %s, externalTrafficPolicy %s; want LoadBalancer, Local", svc.Spec.Type, svc.Spec.ExternalTrafficPolicy)
			}

			// The generated ConfigMap is the one the pods mount, as a
			// directory at /etc/caddy.
			if len(pod.Containers) != 1 {
				t.Fatalf("%d containers, want 1", len(pod.Containers))
			}
			c := pod.Containers[0]
			var cmName string
			for _, v := range pod.Volumes {
				if v.ConfigMap != nil {
					cmName = v.ConfigMap.Name
					for _, m := range c.VolumeMounts {
						if m.Name == v.Name && (m.MountPath != "/etc/caddy" || m.SubPath != "") {
							t.Errorf("ConfigMap volume mounted at %s subPath %q, want the directory /etc/caddy", m.MountPath, m.SubPath)
						}
					}
				}
			}
			if !strings.HasPrefix(cmName, "caddy-config-") {
				t.Fatalf("the pod template mounts ConfigMap %q, not the generated caddy-config-<hash>", cmName)
			}
			var cm struct {
				Data map[string]string `json:"data"`
			}
			s.getJSON(t, &cm, "configmap", cmName)
			rendered := s.kubectl(t, "kustomize", dir)
			if !strings.Contains(rendered, "name: "+cmName+"\n") {
				t.Errorf("ConfigMap %s in the cluster is not the one kustomize generates from %s", cmName, dir)
			}
			_, cfg := s.adaptConfigMap(t, cm.Data)
			t.Logf("%s: ConfigMap %s, files %v", k, cmName, keysOf(cm.Data))

			// Probes: on a port the Caddyfile listens on.
			for name, p := range map[string]*probe{"startup": c.StartupProbe, "readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
				if p == nil || p.HTTPGet == nil {
					t.Errorf("no %s probe (httpGet)", name)
					continue
				}
				port := portOf(t, c, p.HTTPGet.Port, "TCP")
				if !cfg.listens(port) {
					t.Errorf("%s probe on port %d (%s), the Caddyfile listens on %v", name, port, p.HTTPGet.Path, cfg.Apps.HTTP.Servers)
				}
			}
			// The Service's ports are the container's 80/443 TCP and 443 UDP.
			for _, sp := range svc.Spec.Ports {
				if got := portOf(t, c, sp.TargetPort, sp.Protocol); got != sp.Port {
					t.Errorf("Service port %d/%s goes to container port %d", sp.Port, sp.Protocol, got)
				}
			}
			// Shutdown: Kubernetes waits longer than Caddy's delay and grace
			// period together; the admin API listens on loopback only.
			if cfg.Apps.HTTP.ShutdownDelay == 0 || cfg.Apps.HTTP.GracePeriod == 0 {
				t.Errorf("shutdown_delay %v, grace_period %v: both must be set", time.Duration(cfg.Apps.HTTP.ShutdownDelay), time.Duration(cfg.Apps.HTTP.GracePeriod))
			}
			if total := time.Duration(cfg.Apps.HTTP.ShutdownDelay + cfg.Apps.HTTP.GracePeriod); time.Duration(pod.TerminationGracePeriodSeconds)*time.Second <= total {
				t.Errorf("terminationGracePeriodSeconds %d is not longer than shutdown_delay + grace_period = %v", pod.TerminationGracePeriodSeconds, total)
			}
			if cfg.Admin.Listen != "localhost:2019" {
				t.Errorf("admin listens on %q, want localhost:2019", cfg.Admin.Listen)
			}
			if cfg.Storage.Module != "k8s" {
				t.Errorf("storage module %q, want k8s", cfg.Storage.Module)
			}

			hostNet := k == "overlays/hostnetwork"
			if pod.HostNetwork != hostNet {
				t.Errorf("hostNetwork %v", pod.HostNetwork)
			}
			if hostNet {
				if pod.DNSPolicy != "ClusterFirstWithHostNet" {
					t.Errorf("hostNetwork with dnsPolicy %s: the pod would not see cluster DNS", pod.DNSPolicy)
				}
				if len(pod.SecurityContext.Sysctls) != 0 {
					t.Errorf("hostNetwork with sysctls %v: a host-network pod may not set them", pod.SecurityContext.Sysctls)
				}
				if !slices.Equal(c.SecurityContext.Capabilities.Add, []string{"NET_BIND_SERVICE"}) {
					t.Errorf("hostNetwork adds capabilities %v, want NET_BIND_SERVICE", c.SecurityContext.Capabilities.Add)
				}
			} else if len(pod.SecurityContext.Sysctls) != 1 || pod.SecurityContext.Sysctls[0].Name != "net.ipv4.ip_unprivileged_port_start" {
				t.Errorf("sysctls %v, want net.ipv4.ip_unprivileged_port_start", pod.SecurityContext.Sysctls)
			}
			if k == "overlays/example" && !cfg.listens(443) {
				t.Errorf("the example's Caddyfile does not serve HTTPS on 443: %v", cfg.Apps.HTTP.Servers)
			}
		})
	}
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// podFrom renders a kustomization and returns a Pod made from its
// Deployment's template, in namespace ns.
func (s *suite) podFrom(t *testing.T, k, ns, name string) string {
	t.Helper()
	rendered := s.kubectl(t, "kustomize", deployDir(k))
	for _, doc := range strings.Split(rendered, "\n---\n") {
		if !strings.Contains(doc, "\nkind: Deployment\n") {
			continue
		}
		out, err := runInput([]byte(doc), s.tool("kubectl"), "--kubeconfig", s.kubeconfig, "create", "--dry-run=client", "-f", "-", "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		var d struct {
			Spec struct {
				Template struct {
					Metadata map[string]any `json:"metadata"`
					Spec     map[string]any `json:"spec"`
				} `json:"template"`
			} `json:"spec"`
		}
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatal(err)
		}
		meta := d.Spec.Template.Metadata
		meta["name"], meta["namespace"] = name, ns
		b, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": d.Spec.Template.Spec})
		return string(b)
	}
	t.Fatalf("%s renders no Deployment", k)
	return ""
}

// psaNamespace makes a namespace that enforces a Pod Security level, with
// the ServiceAccount the pods name.
func (s *suite) psaNamespace(t *testing.T, name, level string) {
	t.Helper()
	s.apply(t, fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %s
  labels:
    pod-security.kubernetes.io/enforce: %s
    pod-security.kubernetes.io/enforce-version: latest
`, name, level), fmt.Sprintf("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: caddy\n  namespace: %s\n", name))
}

// admitted reports whether the API server would create pod (server-side
// dry run: every admission plugin, nothing stored), and why not.
func (s *suite) admitted(pod string) (bool, string) {
	out, err := runInput([]byte(pod), s.tool("kubectl"), "--kubeconfig", s.kubeconfig, "create", "--dry-run=server", "-f", "-")
	if err != nil {
		return false, out
	}
	return true, out
}

// TestDeployPodSecurity: a pod of the base's Deployment is admitted where
// Pod Security "restricted" is enforced; the hostNetwork overlay's pod is
// admitted only at "privileged", the level its Namespace says.
func TestDeployPodSecurity(t *testing.T) {
	s := requireSuite(t)
	for _, level := range []string{"restricted", "baseline", "privileged"} {
		s.psaNamespace(t, "psa-"+level, level)
	}
	cases := []struct {
		k, level string
		want     bool
	}{
		{"base", "restricted", true},
		{"overlays/example", "restricted", true},
		{"overlays/hostnetwork", "restricted", false},
		{"overlays/hostnetwork", "baseline", false},
		{"overlays/hostnetwork", "privileged", true},
	}
	for _, c := range cases {
		pod := s.podFrom(t, c.k, "psa-"+c.level, "caddy-0")
		ok, out := s.admitted(pod)
		if ok != c.want {
			t.Errorf("%s's pod in a namespace enforcing %s: admitted %v, want %v\n%s", c.k, c.level, ok, c.want, out)
		} else {
			t.Logf("%s's pod at %s: admitted %v %s", c.k, c.level, ok, strings.TrimSpace(lastLine(out)))
		}
	}
	// The documented level is the one the overlay's Namespace enforces.
	rendered := s.kubectl(t, "kustomize", deployDir("overlays/hostnetwork"))
	if !strings.Contains(rendered, "pod-security.kubernetes.io/enforce: privileged\n") {
		t.Errorf("the hostnetwork overlay's Namespace does not enforce privileged")
	}
	// Pod Security is really judging: the base's pod with privilege
	// escalation allowed is refused at restricted.
	bad := strings.Replace(s.podFrom(t, "base", "psa-restricted", "caddy-bad"), `"allowPrivilegeEscalation":false`, `"allowPrivilegeEscalation":true`, 1)
	if ok, _ := s.admitted(bad); ok {
		t.Errorf("a pod allowing privilege escalation was admitted at restricted: Pod Security admission is not enforcing")
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// saKubeconfig writes a kubeconfig that authenticates with a token of the
// deployment's ServiceAccount (kubectl create token, as the kubelet
// projects one into the pod).
func (s *suite) saKubeconfig(t *testing.T) (path, token string) {
	t.Helper()
	token = strings.TrimSpace(s.kubectl(t, "-n", deployNS, "create", "token", "caddy", "--duration=1h"))
	path = filepath.Join(t.TempDir(), "kubeconfig")
	if err := s.writeKubeconfig(path, "caddy", token, deployNS); err != nil {
		t.Fatal(err)
	}
	return path, token
}

// TestDeployRBAC: with the API server in RBAC mode, a token of the
// ServiceAccount does every operation storage k8s makes (Secrets: get, list,
// create, update, delete; Leases: get, create, update, delete) and nothing
// else: no other namespace, no pods, nothing cluster-wide.
func TestDeployRBAC(t *testing.T) {
	s := requireSuite(t)
	s.kubectl(t, "apply", "-k", deployDir("base"))
	kc, _ := s.saKubeconfig(t)
	as := func(args ...string) (string, error) {
		return run(s.tool("kubectl"), append([]string{"--kubeconfig", kc}, args...)...)
	}
	must := func(args ...string) {
		t.Helper()
		if _, err := as(args...); err != nil {
			t.Errorf("as the ServiceAccount: %v", err)
		}
	}
	secret := func(v string) string {
		return fmt.Sprintf(`{"apiVersion":"v1","kind":"Secret","metadata":{"name":"rbac-probe","namespace":%q,"labels":{"probe":"rbac"}},"stringData":{"v":%q}}`, deployNS, v)
	}
	lease := func(holder string) string {
		return fmt.Sprintf(`{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"rbac-probe","namespace":%q},"spec":{"holderIdentity":%q}}`, deployNS, holder)
	}
	stdin := func(body string, args ...string) {
		t.Helper()
		if out, err := runInput([]byte(body), s.tool("kubectl"), append([]string{"--kubeconfig", kc}, args...)...); err != nil {
			t.Errorf("as the ServiceAccount: %v\n%s", err, out)
		}
	}
	// What the storage does, as the storage's identity.
	stdin(secret("1"), "create", "-f", "-")
	must("get", "secret", "rbac-probe")
	must("get", "secrets", "-l", "probe=rbac")
	stdin(secret("2"), "replace", "-f", "-")
	must("delete", "secret", "rbac-probe")
	stdin(lease("a"), "create", "-f", "-")
	must("get", "lease", "rbac-probe")
	stdin(lease("b"), "replace", "-f", "-")
	must("delete", "lease", "rbac-probe")

	// And nothing more: asked of the API server as the ServiceAccount.
	sa := "system:serviceaccount:" + deployNS + ":caddy"
	checks := []struct {
		args []string
		want string
	}{
		{[]string{"get", "secrets", "-n", deployNS}, "yes"},
		{[]string{"list", "secrets", "-n", deployNS}, "yes"},
		{[]string{"create", "secrets", "-n", deployNS}, "yes"},
		{[]string{"update", "secrets", "-n", deployNS}, "yes"},
		{[]string{"delete", "secrets", "-n", deployNS}, "yes"},
		{[]string{"get", "leases.coordination.k8s.io", "-n", deployNS}, "yes"},
		{[]string{"create", "leases.coordination.k8s.io", "-n", deployNS}, "yes"},
		{[]string{"update", "leases.coordination.k8s.io", "-n", deployNS}, "yes"},
		{[]string{"delete", "leases.coordination.k8s.io", "-n", deployNS}, "yes"},
		{[]string{"watch", "secrets", "-n", deployNS}, "no"},
		{[]string{"patch", "secrets", "-n", deployNS}, "no"},
		{[]string{"deletecollection", "secrets", "-n", deployNS}, "no"},
		{[]string{"list", "leases.coordination.k8s.io", "-n", deployNS}, "no"},
		{[]string{"get", "secrets", "-n", "default"}, "no"},
		{[]string{"get", "secrets", "-n", "kube-system"}, "no"},
		{[]string{"list", "secrets", "--all-namespaces"}, "no"},
		{[]string{"list", "pods", "-n", deployNS}, "no"},
		{[]string{"get", "configmaps", "-n", deployNS}, "no"},
		{[]string{"list", "endpointslices.discovery.k8s.io", "-n", deployNS}, "no"},
		{[]string{"list", "namespaces"}, "no"},
		{[]string{"get", "nodes"}, "no"},
		{[]string{"list", "clusterroles.rbac.authorization.k8s.io"}, "no"},
		{[]string{"create", "rolebindings.rbac.authorization.k8s.io", "-n", deployNS}, "no"},
	}
	for _, c := range checks {
		out, _ := run(s.tool("kubectl"), append([]string{"--kubeconfig", s.kubeconfig, "auth", "can-i", "--as", sa}, c.args...)...)
		if got := strings.TrimSpace(lastLine(out)); got != c.want {
			t.Errorf("kubectl auth can-i --as %s %s: %q, want %s", sa, strings.Join(c.args, " "), got, c.want)
		}
	}
	// A request the Role does not cover is refused by the API server.
	if out, err := as("get", "secrets", "-n", "default"); err == nil || !strings.Contains(out, "Forbidden") {
		t.Errorf("the ServiceAccount read Secrets of namespace default: %v\n%s", err, out)
	}
}

// The Role of deploy/base is the one the README documents for storage k8s
// (which TestStorageContract runs the storage as): the same rules.
func TestDeployRoleIsREADMEs(t *testing.T) {
	rules := func(yaml string) string {
		_, after, ok := strings.Cut(yaml, "\nrules:\n")
		if !ok {
			t.Fatalf("no rules in:\n%s", yaml)
		}
		body, _, _ := strings.Cut(after, "\n---")
		var out []string
		for _, line := range strings.Split(body, "\n") {
			if line != "" && !strings.HasPrefix(line, " ") && !strings.HasPrefix(line, "-") {
				break // the next top-level key
			}
			line = strings.NewReplacer(`"`, "", " ", "").Replace(line)
			if line != "" {
				out = append(out, line)
			}
		}
		return strings.Join(out, "\n")
	}
	b, err := os.ReadFile(filepath.Join(deployDir("base"), "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	_, role, _ := strings.Cut(string(b), "\nkind: Role\n")
	got, want := rules(role), rules(readmeRole(t))
	if got != want {
		t.Errorf("deploy/base/rbac.yaml's Role rules:\n%s\nthe README's:\n%s", got, want)
	}
}
