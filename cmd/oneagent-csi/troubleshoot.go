package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/oneagent-csi/oneagent-csi/troubleshoot"
)

// errChecksFailed makes the command exit 1 after it printed its results.
type errChecksFailed struct{}

func (errChecksFailed) Error() string { return "" }

func newTroubleshootCommand() *cobra.Command {
	var (
		kubeconfig, kubeContext, output string
		scope                           troubleshoot.Scope
		inst                            troubleshoot.Install
		timeout                         time.Duration
	)
	cmd := &cobra.Command{
		Use:   "troubleshoot",
		Short: "Check the installation, a namespace's or pod's injection and the mesh, with your kubeconfig",
		Long: `Checks, each printed as ok, warning or failure with the fix in one line:
  cluster:   the CSIDriver; a ready driver pod on every node the DaemonSet selects; the driver
             registered with kubelet on those nodes (CSINode); the webhook's caBundle verifies
             the certificate the injector serves; the webhook's Service has ready endpoints
  namespace: (--namespace, --pod) opted in, each pod injected or why not, FailedMount events,
             NetworkPolicies that keep the agent from the tenant
  istio:     REGISTRY_ONLY without ServiceEntries for the tenant hosts; meshed pods whose
             init-container order breaks the placement rule
Exit code 1 when any check fails.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: must be text or json", output)
			}
			if scope.Pod != "" && scope.Namespace == "" {
				return fmt.Errorf("--pod needs --namespace")
			}
			rules := clientcmd.NewDefaultClientConfigLoadingRules()
			rules.ExplicitPath = kubeconfig
			cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules,
				&clientcmd.ConfigOverrides{CurrentContext: kubeContext}).ClientConfig()
			if err != nil {
				return fmt.Errorf("kubeconfig: %w", err)
			}
			cfg.Timeout = timeout
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			snap, err := troubleshoot.Fetch(ctx, cfg, inst, scope)
			if err != nil {
				return err
			}
			now := time.Now()
			results := append(troubleshoot.Cluster(snap, now), troubleshoot.Namespace(snap)...)
			results = append(results, troubleshoot.Istio(snap)...)
			for what, e := range snap.Errors {
				results = append(results, troubleshoot.Result{Check: "access", Subject: what, Status: troubleshoot.Warning,
					Message: "could not read: " + e, Fix: "run with credentials that may read it, or ignore the checks that need it"})
			}
			if err := printResults(cmd.OutOrStdout(), output, results); err != nil {
				return err
			}
			if troubleshoot.Failed(results) {
				return errChecksFailed{}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
	f.StringVar(&kubeContext, "context", "", "kubeconfig context (default: the current one)")
	f.StringVarP(&scope.Namespace, "namespace", "n", "", "also check this namespace's pods")
	f.StringVar(&scope.Pod, "pod", "", "check only this pod of --namespace")
	f.StringVar(&inst.Namespace, "install-namespace", "oneagent-csi", "namespace of the driver and injector")
	f.StringVarP(&output, "output", "o", "text", "text or json")
	f.DurationVar(&timeout, "timeout", 30*time.Second, "bound of all API calls")
	return cmd
}

func printResults(w io.Writer, format string, results []troubleshoot.Result) error {
	if format == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(results)
	}
	for _, r := range results {
		subject := ""
		if r.Subject != "" {
			subject = " " + r.Subject
		}
		fmt.Fprintf(w, "%-8s %s%s: %s\n", r.Status, r.Check, subject, r.Message)
		if r.Fix != "" {
			fmt.Fprintf(w, "         fix: %s\n", r.Fix)
		}
	}
	return nil
}
