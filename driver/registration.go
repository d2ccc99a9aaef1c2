package driver

import (
	"context"
	"fmt"
	"path/filepath"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// registrationServer answers kubelet's plugin watcher, so no
// node-driver-registrar sidecar is needed.
type registrationServer struct {
	registerapi.UnimplementedRegistrationServer
	name     string
	endpoint string
}

// GetInfo tells kubelet the driver name and where its CSI socket is.
func (s *registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: s.name, Endpoint: s.endpoint, SupportedVersions: []string{"1.0.0"}}, nil
}

// NotifyRegistrationStatus logs kubelet's verdict.
func (s *registrationServer) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if st.PluginRegistered {
		klog.FromContext(ctx).Info("registered with kubelet", "driver", s.name)
	} else {
		klog.FromContext(ctx).Error(nil, "kubelet refused registration", "driver", s.name, "error", st.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// RegistrationSocket is where kubelet's plugin watcher looks for this driver.
func RegistrationSocket(registrationDir, driverName string) string {
	return filepath.Join(registrationDir, driverName+"-reg.sock")
}

// NewRegistrationServer returns a gRPC server for kubelet plugin
// registration; kubeletEndpoint is the CSI socket path as kubelet sees it.
func (d *Driver) NewRegistrationServer(kubeletEndpoint string) (*grpc.Server, error) {
	if !filepath.IsAbs(kubeletEndpoint) {
		return nil, fmt.Errorf("kubelet endpoint %q must be an absolute socket path", kubeletEndpoint)
	}
	s := grpc.NewServer()
	registerapi.RegisterRegistrationServer(s, &registrationServer{name: d.opts.DriverName, endpoint: kubeletEndpoint})
	return s, nil
}
