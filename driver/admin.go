package driver

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// Admin API paths, served over the node's admin unix socket.
const (
	AdminArtifacts = "/v1/artifacts"
	AdminVolumes   = "/v1/volumes"
	AdminDu        = "/v1/du"
	AdminVerify    = "/v1/verify"
	AdminGC        = "/v1/gc"
	// AdminTenantCheck makes the calls the driver makes to the tenants
	// (?tenant=<name> for one).
	AdminTenantCheck = "/v1/tenant-check"
)

// AdminHandler serves the Inspector as JSON: GET artifacts[/<key>],
// volumes, du; POST verify[?artifact=key] and gc[?dryRun=true]. Only the
// root user of the node can reach the socket (0600).
func AdminHandler(in *Inspector) http.Handler {
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, v any, err error) {
		w.Header().Set("Content-Type", "application/json")
		if err != nil {
			code := http.StatusInternalServerError
			switch {
			case errors.Is(err, storage.ErrNotFound):
				code = http.StatusNotFound
			case errors.Is(err, ErrOffline):
				code = http.StatusNotImplemented
			}
			w.WriteHeader(code)
			_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
			return
		}
		_ = json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("GET "+AdminArtifacts, func(w http.ResponseWriter, r *http.Request) {
		v, err := in.Artifacts(r.Context())
		reply(w, v, err)
	})
	mux.HandleFunc("GET "+AdminArtifacts+"/{key}", func(w http.ResponseWriter, r *http.Request) {
		v, err := in.Show(r.Context(), r.PathValue("key"))
		reply(w, v, err)
	})
	mux.HandleFunc("GET "+AdminVolumes, func(w http.ResponseWriter, r *http.Request) {
		v, err := in.Volumes(r.Context())
		reply(w, v, err)
	})
	mux.HandleFunc("GET "+AdminDu, func(w http.ResponseWriter, r *http.Request) {
		v, err := in.Du(r.Context())
		reply(w, v, err)
	})
	mux.HandleFunc("POST "+AdminVerify, func(w http.ResponseWriter, r *http.Request) {
		v, err := in.Verify(r.Context(), r.URL.Query().Get("artifact"))
		reply(w, v, err)
	})
	mux.HandleFunc("POST "+AdminTenantCheck, func(w http.ResponseWriter, r *http.Request) {
		v, err := in.TenantCheck(r.Context(), r.URL.Query().Get("tenant"))
		if errors.Is(err, provisioner.ErrUnknownTenant) {
			err = fmt.Errorf("%w: %w", storage.ErrNotFound, err)
		}
		reply(w, v, err)
	})
	mux.HandleFunc("POST "+AdminGC, func(w http.ResponseWriter, r *http.Request) {
		dry, _ := strconv.ParseBool(r.URL.Query().Get("dryRun"))
		klog.InfoS("cache gc requested over the admin socket", "dryRun", dry)
		v, err := in.RunGC(klog.NewContext(r.Context(), klog.Background()), dry)
		reply(w, v, err)
	})
	return mux
}
