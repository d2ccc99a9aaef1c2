package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
)

func newIstioCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "istio", Short: "Istio helpers"}
	var configPath, tenant, namespace string
	var timeout time.Duration
	egress := &cobra.Command{
		Use:   "egress",
		Short: "Render ServiceEntries for a tenant's API host and communication endpoints (REGISTRY_ONLY meshes)",
		Long: `Render Istio ServiceEntry objects (networking.istio.io/v1) for the tenant's API host and every communication
endpoint its connectioninfo lists, so that the node driver and the agents in meshed pods reach the tenant when the
mesh's outboundTrafficPolicy is REGISTRY_ONLY. Reads the tenant from the node config; prints YAML:
  oneagent-csi istio egress --config node.yaml --tenant prod | kubectl apply -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := LoadNodeConfig(configPath)
			if err != nil {
				return err
			}
			var t *provisioner.Tenant
			var names []string
			for i := range cfg.Tenants {
				names = append(names, cfg.Tenants[i].Name)
				if cfg.Tenants[i].Name == tenant {
					t = &cfg.Tenants[i]
				}
			}
			if t == nil {
				return fmt.Errorf("--tenant %q: not in %s (tenants: %s)", tenant, configPath, strings.Join(names, ", "))
			}
			client, err := provisioner.NewClient(*t, provisioner.ClientOptions{})
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			info, err := client.ConnectionInfo(ctx)
			if err != nil {
				return err
			}
			return renderServiceEntries(cmd.OutOrStdout(), t.Name, namespace, append([]string{t.APIURL}, info.CommunicationEndpoints...))
		},
	}
	f := egress.Flags()
	f.StringVar(&configPath, "config", "/etc/oneagent-csi/config/config.yaml", "node config file with the tenant")
	f.StringVar(&tenant, "tenant", "", "tenant name (required)")
	f.StringVar(&namespace, "namespace", "istio-system", "namespace of the ServiceEntries (istio-system: visible mesh-wide)")
	f.DurationVar(&timeout, "timeout", 30*time.Second, "give up asking the tenant after this long")
	_ = egress.MarkFlagRequired("tenant")
	cmd.AddCommand(egress)
	return cmd
}

var nonName = regexp.MustCompile(`[^a-z0-9-]+`)

// renderServiceEntries writes one ServiceEntry per host of urls (ports
// merged), as YAML documents in a stable order.
func renderServiceEntries(w io.Writer, tenant, namespace string, urls []string) error {
	ports := map[string][]int{}
	var hosts []string
	for _, raw := range urls {
		u, err := url.Parse(raw)
		if err != nil || u.Hostname() == "" {
			return fmt.Errorf("endpoint %q: not a URL with a host", raw)
		}
		port := 443
		if u.Scheme == "http" {
			port = 80
		}
		if p := u.Port(); p != "" {
			if port, err = strconv.Atoi(p); err != nil {
				return fmt.Errorf("endpoint %q: port: %w", raw, err)
			}
		}
		h := strings.ToLower(u.Hostname())
		if _, ok := ports[h]; !ok {
			hosts = append(hosts, h)
		}
		if !slices.Contains(ports[h], port) {
			ports[h] = append(ports[h], port)
		}
	}
	slices.Sort(hosts)
	for i, h := range hosts {
		slices.Sort(ports[h])
		var ps []map[string]any
		for _, p := range ports[h] {
			ps = append(ps, map[string]any{"number": p, "name": fmt.Sprintf("tls-%d", p), "protocol": "TLS"})
		}
		name := strings.Trim(nonName.ReplaceAllString("oneagent-csi-"+tenant+"-"+h, "-"), "-")
		if len(name) > 63 {
			name = strings.TrimRight(name[:63], "-")
		}
		spec := map[string]any{"hosts": []string{h}, "location": "MESH_EXTERNAL", "resolution": "DNS", "ports": ps}
		if ip := net.ParseIP(h); ip != nil {
			// A ServiceEntry host must be a name: an IP endpoint gets a
			// made-up one and its address.
			spec["hosts"] = []string{fmt.Sprintf("%s.%s.oneagent-csi.local", strings.NewReplacer(".", "-", ":", "-").Replace(h), tenant)}
			spec["addresses"] = []string{h}
			spec["resolution"] = "STATIC"
			spec["endpoints"] = []map[string]any{{"address": h}}
		}
		obj := map[string]any{
			"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
			"metadata": map[string]any{"name": name, "namespace": namespace,
				"labels": map[string]string{"app.kubernetes.io/part-of": "oneagent-csi", "oneagent.dynatrace.com/tenant": tenant}},
			"spec": spec,
		}
		b, err := yaml.Marshal(obj)
		if err != nil {
			return err
		}
		if i > 0 {
			if _, err := io.WriteString(w, "---\n"); err != nil {
				return err
			}
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}
