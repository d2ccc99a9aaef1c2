package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// cacheAPI is what `cache` asks: the node process over its admin socket,
// or, with --offline, a read-only index directly (driver.Inspector).
type cacheAPI interface {
	Artifacts(ctx context.Context) ([]storage.ArtifactInfo, error)
	Show(ctx context.Context, key string) ([]storage.ArtifactDetail, error)
	Volumes(ctx context.Context) ([]storage.Volume, error)
	Du(ctx context.Context) (storage.DiskUsage, error)
	Verify(ctx context.Context, key string) ([]storage.VerifyResult, error)
	RunGC(ctx context.Context, dryRun bool) (provisioner.GCReport, error)
	TenantCheck(ctx context.Context, tenant string) ([]provisioner.TenantCheck, error)
}

type cacheFlags struct {
	socket, dataDir, output string
	offline                 bool
	timeout                 time.Duration
}

func newCacheCommand() *cobra.Command {
	f := &cacheFlags{}
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "Inspect the node's code module cache (ls, show, volumes, verify, du, gc) and check its tenants (tenant-check)",
		Long: `Inspect the node's cache. Asks the running node process over its admin socket; with --offline it opens
index.db read-only instead (for a node process that is down; gc is not available then). Run it in the node pod:
  kubectl exec -n oneagent-csi ds/oneagent-csi-node -- oneagent-csi cache ls`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.socket, "admin-socket", defaultAdminSocket, "admin socket of the node process")
	pf.BoolVar(&f.offline, "offline", false, "read index.db read-only instead of asking the node process")
	pf.StringVar(&f.dataDir, "data-dir", defaultDataDir, "data dir (with --offline)")
	pf.StringVarP(&f.output, "output", "o", "table", "output format: table, json or yaml")
	pf.DurationVar(&f.timeout, "timeout", 2*time.Minute, "give up after this long (verify of many large artifacts takes a while)")

	run := func(use, short string, args cobra.PositionalArgs, do func(ctx context.Context, api cacheAPI, args []string, out io.Writer) error) *cobra.Command {
		return &cobra.Command{Use: use, Short: short, Args: args, RunE: func(cmd *cobra.Command, args []string) error {
			if f.output != "table" && f.output != "json" && f.output != "yaml" {
				return fmt.Errorf("--output %q: want table, json or yaml", f.output)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), f.timeout)
			defer cancel()
			api, closeAPI, err := f.open(cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer closeAPI()
			return do(ctx, api, args, cmd.OutOrStdout())
		}}
	}
	var dryRun bool
	gc := run("gc", "Run a GC pass in the node process (--dry-run: only say what it would delete)", cobra.NoArgs,
		func(ctx context.Context, api cacheAPI, _ []string, out io.Writer) error {
			rep, err := api.RunGC(ctx, dryRun)
			if err != nil {
				return err
			}
			return f.print(out, rep, func(w *tabwriter.Writer) { printGC(w, rep) })
		})
	gc.Flags().BoolVar(&dryRun, "dry-run", false, "only report what would be deleted")
	tenantCheck := run("tenant-check [tenant]", "Ask the tenants now as the driver does (DNS, TLS, token, version); exit 1 when one fails", cobra.MaximumNArgs(1),
		func(ctx context.Context, api cacheAPI, args []string, out io.Writer) error {
			name := ""
			if len(args) == 1 {
				name = args[0]
			}
			v, err := api.TenantCheck(ctx, name)
			if err != nil {
				return err
			}
			if err := f.print(out, v, func(w *tabwriter.Writer) { printTenantCheck(w, v) }); err != nil {
				return err
			}
			for _, c := range v {
				if !c.OK() {
					return fmt.Errorf("tenant-check: tenant %s fails", c.Tenant)
				}
			}
			return nil
		})
	cmd.AddCommand(
		tenantCheck,
		run("ls", "List cached code modules", cobra.NoArgs, func(ctx context.Context, api cacheAPI, _ []string, out io.Writer) error {
			v, err := api.Artifacts(ctx)
			if err != nil {
				return err
			}
			return f.print(out, v, func(w *tabwriter.Writer) { printArtifacts(w, v) })
		}),
		run("show <artifact-id-prefix|version>", "Show one code module with its tenant layers and volumes", cobra.ExactArgs(1),
			func(ctx context.Context, api cacheAPI, args []string, out io.Writer) error {
				v, err := api.Show(ctx, args[0])
				if err != nil {
					return err
				}
				return f.print(out, v, func(w *tabwriter.Writer) { printShow(w, v) })
			}),
		run("volumes", "List volume records (volume, pod, tenant, artifact, mode, since)", cobra.NoArgs,
			func(ctx context.Context, api cacheAPI, _ []string, out io.Writer) error {
				v, err := api.Volumes(ctx)
				if err != nil {
					return err
				}
				return f.print(out, v, func(w *tabwriter.Writer) { printVolumes(w, v) })
			}),
		run("verify [artifact-id-prefix|version]", "Re-hash code modules against their manifests; exit 1 on corruption", cobra.MaximumNArgs(1),
			func(ctx context.Context, api cacheAPI, args []string, out io.Writer) error {
				key := ""
				if len(args) == 1 {
					key = args[0]
				}
				v, err := api.Verify(ctx, key)
				if err != nil {
					return err
				}
				if err := f.print(out, v, func(w *tabwriter.Writer) { printVerify(w, v) }); err != nil {
					return err
				}
				bad := 0
				for _, r := range v {
					if !r.OK() {
						bad++
					}
				}
				if bad > 0 {
					return fmt.Errorf("verify: %d of %d artifacts do not match their manifest", bad, len(v))
				}
				return nil
			}),
		run("du", "Disk usage by artifact, tenant layer, volumes and tmp", cobra.NoArgs,
			func(ctx context.Context, api cacheAPI, _ []string, out io.Writer) error {
				v, err := api.Du(ctx)
				if err != nil {
					return err
				}
				return f.print(out, v, func(w *tabwriter.Writer) { printDu(w, v) })
			}),
		gc,
	)
	return cmd
}

// open returns the admin client, or with --offline an Inspector on a
// read-only index.
func (f *cacheFlags) open(stderr io.Writer) (cacheAPI, func(), error) {
	if !f.offline {
		return newAdminClient(f.socket), func() {}, nil
	}
	layout, err := storage.NewLayout(f.dataDir)
	if err != nil {
		return nil, nil, fmt.Errorf("--data-dir: %w", err)
	}
	idx, err := storage.OpenIndex(layout.Abs(layout.IndexFile()), 5*time.Second, true)
	if err != nil {
		return nil, nil, fmt.Errorf("offline: %w (is the node process still running? then drop --offline)", err)
	}
	fmt.Fprintf(stderr, "offline: reading %s read-only; the node process is not asked\n", layout.Abs(layout.IndexFile()))
	return &driver.Inspector{Index: idx, Layout: layout}, func() { _ = idx.Close() }, nil
}

func (f *cacheFlags) print(out io.Writer, v any, table func(w *tabwriter.Writer)) error {
	switch f.output {
	case "json":
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "yaml":
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = out.Write(b)
		return err
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	table(w)
	return w.Flush()
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func bytesHuman(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printArtifacts(w io.Writer, v []storage.ArtifactInfo) {
	fmt.Fprintln(w, "ARTIFACT\tVERSION\tFLAVOR\tARCH\tTENANTS\tSIZE\tFILES\tREFS\tMOUNTS\tLAST USED\tSTATE")
	for _, a := range v {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\n", short(a.ID), displayVersion(a), dash(a.Flavor), dash(a.Arch),
			dash(strings.Join(a.Tenants, ",")), bytesHuman(a.Size), a.Files, a.Refs, a.Mounts, stamp(a.LastUsed), a.State)
	}
}

// displayVersion is an artifact's version, or for an image artifact its
// reference with the manifest digest shortened.
func displayVersion(a storage.ArtifactInfo) string {
	if a.Image == "" {
		return a.Version
	}
	d := a.Version
	if len(d) > len("sha256:")+12 {
		d = d[:len("sha256:")+12]
	}
	return a.Image + "@" + d
}

func printShow(w io.Writer, v []storage.ArtifactDetail) {
	for i, d := range v {
		if i > 0 {
			fmt.Fprintln(w)
		}
		head := [][2]string{{"Artifact", d.ID}, {"Version", d.Version}}
		if d.Image != "" {
			head = append(head, [2]string{"Image", d.Image})
		}
		for _, kv := range append(head, [][2]string{{"Flavor", dash(d.Flavor)}, {"Arch", dash(d.Arch)},
			{"Tenants", dash(strings.Join(d.Tenants, ","))}, {"Size", fmt.Sprintf("%s (%d bytes)", bytesHuman(d.Size), d.Size)},
			{"Files", fmt.Sprint(d.Files)}, {"State", d.State}, {"Installed", stamp(d.InstalledAt)}, {"Last used", stamp(d.LastUsed)},
			{"Refs", fmt.Sprint(d.Refs)}, {"Mounts", fmt.Sprint(d.Mounts)},
		}...) {
			fmt.Fprintf(w, "%s:\t%s\n", kv[0], kv[1])
		}
		fmt.Fprintln(w, "Layers:")
		for _, l := range d.Layers {
			fmt.Fprintf(w, "  %s/%s\trevision %d\t%s\n", l.Tenant, l.Rev, l.Revision, stamp(l.CreatedAt))
		}
		fmt.Fprintln(w, "Volumes:")
		for _, vol := range d.Volumes {
			fmt.Fprintf(w, "  %s\t%s/%s\t%s\n", vol.ID, dash(vol.PodNamespace), dash(vol.PodName), vol.State)
		}
	}
}

func printVolumes(w io.Writer, v []storage.Volume) {
	slices.SortFunc(v, func(a, b storage.Volume) int { return strings.Compare(a.ID, b.ID) })
	fmt.Fprintln(w, "VOLUME\tPOD\tTENANT\tARTIFACT\tMODE\tSTATE\tSINCE")
	for _, vol := range v {
		pod := "-"
		if vol.PodName != "" {
			pod = vol.PodNamespace + "/" + vol.PodName
		}
		since := vol.PublishedAt
		if since.IsZero() {
			since = vol.FirstAttempt
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", vol.ID, pod, dash(vol.Tenant), dash(short(vol.ArtifactID)), vol.Mode, vol.State, stamp(since))
	}
}

func printVerify(w io.Writer, v []storage.VerifyResult) {
	fmt.Fprintln(w, "ARTIFACT\tVERSION\tFILES\tRESULT")
	for _, r := range v {
		result := "ok"
		if !r.OK() {
			result = fmt.Sprintf("CORRUPT (%d %s)", len(r.Problems), plural(len(r.Problems), "problem"))
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", short(r.ID), r.Version, r.Files, result)
		for _, p := range r.Problems {
			fmt.Fprintf(w, "  %s\n", p) // no tab: does not widen the columns
		}
	}
}

func printDu(w io.Writer, du storage.DiskUsage) {
	fmt.Fprintln(w, "PART\tNAME\tSIZE")
	ids := make([]string, 0, len(du.Artifacts))
	for id := range du.Artifacts {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		fmt.Fprintf(w, "artifact\t%s\t%s\n", short(id), bytesHuman(du.Artifacts[id]))
	}
	refs := make([]string, 0, len(du.Layers))
	for r := range du.Layers {
		refs = append(refs, r)
	}
	slices.Sort(refs)
	for _, r := range refs {
		fmt.Fprintf(w, "layer\t%s\t%s\n", r, bytesHuman(du.Layers[r]))
	}
	fmt.Fprintf(w, "host\t-\t%s\nvolumes\t-\t%s\ntmp\t-\t%s\nindex\t-\t%s\ntotal\t-\t%s\n",
		bytesHuman(du.Host), bytesHuman(du.Volumes), bytesHuman(du.Tmp), bytesHuman(du.Index), bytesHuman(du.Total))
}

func printGC(w io.Writer, r provisioner.GCReport) {
	fmt.Fprintln(w, "KIND\tID\tDETAIL\tSIZE\tREASON")
	for _, d := range r.Deleted {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", d.Kind, short(d.ID), dash(d.Detail), bytesHuman(d.Bytes), d.Reason)
	}
	verb := "deleted"
	if r.DryRun {
		verb = "would delete"
	}
	fmt.Fprintf(w, "\n%s %d, freeing %s; cache now %s", verb, len(r.Deleted), bytesHuman(r.FreedBytes), bytesHuman(r.CacheBytes))
	if r.OverrunBytes > 0 {
		fmt.Fprintf(w, ", %s over budget (in use or current)", bytesHuman(r.OverrunBytes))
	}
	fmt.Fprintln(w)
}

// adminClient talks JSON to the node's admin socket.
type adminClient struct {
	socket string
	http   *http.Client
}

func newAdminClient(socket string) *adminClient {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &adminClient{socket: socket, http: &http.Client{Transport: tr}}
}

func (c *adminClient) call(ctx context.Context, method, path string, q url.Values, out any) error {
	u := "http://node" + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("admin socket %s: %w (is the node process running? else use --offline)", c.socket, unwrapURL(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		_ = json.NewDecoder(resp.Body).Decode(&e)
		if resp.StatusCode == http.StatusNotFound {
			return fmt.Errorf("%s: %w", e.Error, storage.ErrNotFound)
		}
		return fmt.Errorf("node process: %s", dash(e.Error))
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func (c *adminClient) Artifacts(ctx context.Context) (v []storage.ArtifactInfo, err error) {
	return v, c.call(ctx, http.MethodGet, driver.AdminArtifacts, nil, &v)
}

func (c *adminClient) Show(ctx context.Context, key string) (v []storage.ArtifactDetail, err error) {
	return v, c.call(ctx, http.MethodGet, driver.AdminArtifacts+"/"+url.PathEscape(filepath.Base(key)), nil, &v)
}

func (c *adminClient) Volumes(ctx context.Context) (v []storage.Volume, err error) {
	return v, c.call(ctx, http.MethodGet, driver.AdminVolumes, nil, &v)
}

func (c *adminClient) Du(ctx context.Context) (v storage.DiskUsage, err error) {
	return v, c.call(ctx, http.MethodGet, driver.AdminDu, nil, &v)
}

func (c *adminClient) Verify(ctx context.Context, key string) (v []storage.VerifyResult, err error) {
	q := url.Values{}
	if key != "" {
		q.Set("artifact", key)
	}
	return v, c.call(ctx, http.MethodPost, driver.AdminVerify, q, &v)
}

func (c *adminClient) TenantCheck(ctx context.Context, tenant string) (v []provisioner.TenantCheck, err error) {
	q := url.Values{}
	if tenant != "" {
		q.Set("tenant", tenant)
	}
	return v, c.call(ctx, http.MethodPost, driver.AdminTenantCheck, q, &v)
}

func (c *adminClient) RunGC(ctx context.Context, dryRun bool) (v provisioner.GCReport, err error) {
	return v, c.call(ctx, http.MethodPost, driver.AdminGC, url.Values{"dryRun": {fmt.Sprint(dryRun)}}, &v)
}

func printTenantCheck(w *tabwriter.Writer, v []provisioner.TenantCheck) {
	fmt.Fprintln(w, "TENANT\tSTEP\tOK\tDETAIL")
	for _, c := range v {
		for _, s := range c.Steps {
			fmt.Fprintf(w, "%s\t%s\t%v\t%s\n", c.Tenant, s.Name, s.OK, s.Detail)
		}
	}
}
