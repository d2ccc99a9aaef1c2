// Command run-demo shows the node driver working on one machine without a
// cluster: it starts a fake tenant, runs `oneagent-csi node` with a temporary
// data dir and socket, publishes one volume through a CSI client like kubelet
// would, shows the mounted agent files, unpublishes and cleans up. Needs root.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/mount-utils"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

func main() {
	bin := flag.String("binary", "bin/oneagent-csi", "oneagent-csi binary to run")
	keep := flag.Bool("keep", false, "keep the temporary dir (data dir, logs) for inspection")
	flag.Parse()
	if err := run(*bin, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "run-demo:", err)
		os.Exit(1)
	}
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

func run(bin string, keep bool) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root: the node driver mounts overlays")
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	root, err := os.MkdirTemp("", "oneagent-csi-demo-")
	if err != nil {
		return err
	}
	targets := filepath.Join(root, "kubelet/pods")
	defer func() {
		unmountBelow(root)
		if keep {
			fmt.Println("kept", root)
			return
		}
		_ = os.RemoveAll(root)
	}()

	step("starting a fake tenant (synthetic code modules over HTTPS on loopback)")
	tenant, err := faketenant.Start(faketenant.Options{ModuleSize: 8 << 20, CacheDir: filepath.Join(root, "tenant-cache")})
	if err != nil {
		return err
	}
	defer tenant.Close()
	if err := tenant.WriteCA(filepath.Join(root, "tenant-ca.pem")); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "token"), []byte(tenant.Token()), 0o600); err != nil {
		return err
	}
	fmt.Println("tenant API:", tenant.URL, "latest version:", tenant.Latest())

	socket := filepath.Join(root, "csi/csi.sock")
	cfg := map[string]any{
		"nodeID": "demo-node", "dataDir": filepath.Join(root, "data"), "csiSocket": socket, "httpAddr": "127.0.0.1:0",
		"kubeletDir": filepath.Join(root, "kubelet"),
		"tenants": []map[string]string{{"name": "demo", "apiURL": tenant.URL, "tokenFile": filepath.Join(root, "token"),
			"caFile": filepath.Join(root, "tenant-ca.pem")}},
	}
	data, _ := yaml.Marshal(cfg)
	cfgPath := filepath.Join(root, "node.yaml")
	if err := os.WriteFile(cfgPath, data, 0o600); err != nil {
		return err
	}
	step("node config %s", cfgPath)
	fmt.Print(string(data))

	step("starting %s node (log: %s)", bin, filepath.Join(root, "node.log"))
	logf, err := os.Create(filepath.Join(root, "node.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	node := exec.Command(bin, "node", "--config", cfgPath, "-v", "1")
	node.Stdout, node.Stderr = logf, logf
	if err := node.Start(); err != nil {
		return err
	}
	defer func() {
		_ = node.Process.Signal(syscall.SIGTERM)
		_ = node.Wait()
	}()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 5*time.Minute)
	defer cancelT()

	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ident, nodeClient := csi.NewIdentityClient(conn), csi.NewNodeClient(conn)
	for {
		r, err := ident.Probe(ctx, &csi.ProbeRequest{})
		if err == nil && r.GetReady().GetValue() {
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("node never became ready: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	info, err := ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return err
	}
	fmt.Printf("ready: %s %s\n", info.Name, info.VendorVersion)

	target := filepath.Join(targets, "0f1e2d3c/volumes/kubernetes.io~csi/oneagent/mount")
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return err
	}
	req := &csi.NodePublishVolumeRequest{
		VolumeId: "csi-demo-volume", TargetPath: target, Readonly: true,
		VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}},
		VolumeContext: map[string]string{"mode": "app", "dynakube": "demo", "csi.storage.k8s.io/ephemeral": "true",
			"csi.storage.k8s.io/pod.name": "demo-app", "csi.storage.k8s.io/pod.namespace": "default", "csi.storage.k8s.io/pod.uid": "0f1e2d3c"},
	}
	step("NodePublishVolume %s (kubelet retries non-final codes while the module downloads)", target)
	start := time.Now()
	for {
		_, err = nodeClient.NodePublishVolume(ctx, req)
		if err == nil {
			break
		}
		fmt.Println("  not yet:", err)
		if ctx.Err() != nil {
			return err
		}
		time.Sleep(time.Second)
	}
	fmt.Printf("published in %v\n", time.Since(start).Round(time.Millisecond))

	step("the mount, as the kernel sees it")
	mis, _ := mount.ParseMountInfo("/proc/self/mountinfo")
	for _, m := range mis {
		if m.MountPoint == target {
			fmt.Printf("%s on %s type %s (%s)\n  %s\n", m.Source, m.MountPoint, m.FsType, strings.Join(m.MountOptions, ","), strings.Join(m.SuperOptions, ","))
		}
	}
	step("agent files at the target (first 25)")
	n := 0
	_ = filepath.WalkDir(target, func(p string, d fs.DirEntry, err error) error {
		if err != nil || n >= 25 {
			return filepath.SkipAll
		}
		rel, _ := filepath.Rel(target, p)
		if info, err := d.Info(); err == nil && rel != "." {
			fmt.Printf("  %s %10d %s\n", info.Mode(), info.Size(), rel)
			n++
		}
		return nil
	})
	step("agent/conf/ruxitagentproc.conf (code module's file merged with the tenant's settings)")
	if f, err := os.Open(filepath.Join(target, "agent/conf/ruxitagentproc.conf")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fmt.Println("  " + sc.Text())
		}
		f.Close()
	}
	step("writing into the volume is refused")
	err = os.WriteFile(filepath.Join(target, "agent/evil"), []byte("x"), 0o644)
	fmt.Println("  write:", err)
	if err == nil {
		return fmt.Errorf("the volume is writable")
	}

	step("NodeUnpublishVolume")
	if _, err := nodeClient.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: target}); err != nil {
		return err
	}
	if _, err := os.Stat(target); err == nil {
		return fmt.Errorf("target still exists after unpublish")
	}
	fmt.Println("  target removed:", target)
	step("done: stopping the node and removing %s", root)
	return nil
}

func unmountBelow(dir string) {
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return
	}
	for i := len(mis) - 1; i >= 0; i-- {
		if strings.HasPrefix(mis[i].MountPoint, dir+"/") {
			_ = syscall.Unmount(mis[i].MountPoint, syscall.MNT_DETACH)
		}
	}
}
