// Command fake-tenant serves the Dynatrace tenant routes oneagent-csi uses,
// with synthetic code modules, for demos and manual testing.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8443", "listen address (loopback only)")
	dir := flag.String("dir", "fake-tenant", "writes ca.pem and token here; caches generated modules")
	size := flag.Int64("module-size", 8<<20, "approximate code module ZIP size in bytes (up to 1 GiB)")
	flag.Parse()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	srv, err := faketenant.Start(faketenant.Options{Addr: *addr, ModuleSize: *size, CacheDir: filepath.Join(*dir, "modules")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer srv.Close()
	_ = srv.WriteCA(filepath.Join(*dir, "ca.pem"))
	_ = os.WriteFile(filepath.Join(*dir, "token"), []byte(srv.Token()), 0o600)
	fmt.Printf("apiURL: %s\ncaFile: %s\ntokenFile: %s\nlatest: %s\n", srv.URL, filepath.Join(*dir, "ca.pem"), filepath.Join(*dir, "token"), srv.Latest())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
}
