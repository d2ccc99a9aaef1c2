// Package sanity runs kubernetes-csi/csi-test's sanity suite against the real
// gRPC server with real mounts. A tiny in-process controller answers the
// controller calls the suite makes, so the node publish specs run too.
package sanity

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// fakeController creates ephemeral-looking volumes so that sanity's node
// specs get a volume id and context like kubelet would send.
type fakeController struct {
	csi.UnimplementedControllerServer
	csi.UnimplementedIdentityServer
	n atomic.Int64
}

func (c *fakeController) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: "fake-controller.oneagent.dynatrace.com", VendorVersion: "test"}, nil
}

func (c *fakeController) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{Type: &csi.PluginCapability_Service_{
		Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}}}}, nil
}

func (c *fakeController) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

func (c *fakeController) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{{Type: &csi.ControllerServiceCapability_Rpc{
		Rpc: &csi.ControllerServiceCapability_RPC{Type: csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME}}}}}, nil
}

func (c *fakeController) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	id := fmt.Sprintf("csi-%d-%s", c.n.Add(1), req.GetName())
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: id, CapacityBytes: req.GetCapacityRange().GetRequiredBytes(),
		VolumeContext: map[string]string{
			"csi.storage.k8s.io/ephemeral":     "true",
			"csi.storage.k8s.io/pod.name":      "sanity-" + req.GetName(),
			"csi.storage.k8s.io/pod.namespace": "sanity",
		}}}, nil
}

func (c *fakeController) DeleteVolume(context.Context, *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	return &csi.DeleteVolumeResponse{}, nil
}

func TestSanity(t *testing.T) {
	harness.RequireRoot(t)
	node := harness.Start(t, harness.Config{})

	ctrlSock := filepath.Join(t.TempDir(), "controller.sock")
	l, err := driver.Listen(ctrlSock)
	if err != nil {
		t.Fatal(err)
	}
	ctrl := &fakeController{}
	srv := newGRPC()
	csi.RegisterControllerServer(srv, ctrl)
	csi.RegisterIdentityServer(srv, ctrl)
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + node.Socket
	cfg.ControllerAddress = "unix://" + ctrlSock
	// The suite publishes at <TargetPath>/target.
	cfg.TargetPath = filepath.Dir(harness.Target(node.TargetRoot, "sanity"))
	// The suite makes TargetPath itself; kubelet makes the dirs above.
	if err := os.MkdirAll(filepath.Dir(cfg.TargetPath), 0o750); err != nil {
		t.Fatal(err)
	}
	cfg.StagingPath = filepath.Join(node.TargetRoot, "staging")
	cfg.IdempotentCount = 3

	sanity.GinkgoTest(&cfg)
	RegisterFailHandler(Fail)
	suite, reporter := GinkgoConfiguration()
	suite.SkipStrings = []string{`\[Controller Server\]`, "GroupController", "ExpandVolume", "SnapshotMetadata"}
	RunSpecs(t, "oneagent-csi sanity", suite, reporter)

	// Every publish of the suite was served from one download.
	if n := node.Tenant.Requests("download"); n != 1 {
		t.Errorf("the suite caused %d downloads, want 1", n)
	}
}
