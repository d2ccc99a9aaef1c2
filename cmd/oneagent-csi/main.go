// Command oneagent-csi is the single binary of oneagent-csi: the CSI node
// driver (node), the admission webhook (injector) and the init container of
// injected pods (init).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := newRootCommand().Execute(); err != nil {
		var failed errChecksFailed
		if !errors.As(err, &failed) {
			fmt.Fprintln(os.Stderr, "error:", err)
		}
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "oneagent-csi",
		Short:         "Serve Dynatrace OneAgent code modules into Kubernetes pods",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	klogFlags := flag.NewFlagSet("klog", flag.ExitOnError)
	klog.InitFlags(klogFlags)
	root.PersistentFlags().AddGoFlag(klogFlags.Lookup("v"))
	root.AddCommand(newNodeCommand(), newInjectorCommand(), newInitCommand(), newCacheCommand(), newIstioCommand(), newTroubleshootCommand(), newMirrorCommand(), &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), version) },
	})
	return root
}
