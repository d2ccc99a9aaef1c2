package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/oneagent-csi/oneagent-csi/injector/initcontainer"
)

func newInitCommand() *cobra.Command {
	var (
		o          initcontainer.Options
		containers []string
	)
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Init container of injected pods: check the agent volume and write per-container configuration",
		Long: `Run as the init container dynatrace-oneagent-init that the injector adds. Needs no network.
Checks that the CSI volume holds the agent and writes <config-dir>/<container>/agent/config/container.conf
for every --container. Pod details come from $K8S_PODNAME, $K8S_PODUID, $K8S_NAMESPACE and $K8S_NODE_NAME.
When the agent is missing it says so and exits 0, or 1 with --failure-policy=fail.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, c := range containers {
				parsed, err := initcontainer.ParseContainer(c)
				if err != nil {
					return err
				}
				o.Containers = append(o.Containers, parsed)
			}
			o.PodName, o.PodUID = os.Getenv("K8S_PODNAME"), os.Getenv("K8S_PODUID")
			o.Namespace, o.NodeName = os.Getenv("K8S_NAMESPACE"), os.Getenv("K8S_NODE_NAME")
			o.Out = cmd.OutOrStdout()
			return initcontainer.Run(o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.InstallPath, "install-path", "/opt/dynatrace/oneagent-paas", "where the agent volume is mounted")
	f.StringVar(&o.ConfigDir, "config-dir", "/mnt/config", "where the oneagent-config volume is mounted")
	f.StringVar(&o.FailurePolicy, "failure-policy", "silent", "silent: start without a missing agent; fail: exit 1 so the pod does not start")
	f.StringArrayVar(&containers, "container", nil, "app container as name=image (repeatable)")
	return cmd
}
