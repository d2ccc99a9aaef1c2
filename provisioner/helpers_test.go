package provisioner_test

import (
	"net"

	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

func afs(l storage.Layout) afero.Fs { return afero.NewBasePathFs(afero.NewOsFs(), l.Root()) }
