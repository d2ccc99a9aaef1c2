package storage

import (
	"encoding/json"
	"fmt"
	"path/filepath"

	"github.com/spf13/afero"
)

// layerInfoName is the record file inside a tenant layer dir, hidden from pods
// only by its name; it holds no secret (the tenant token lives in the merged
// ruxitagentproc.conf, which the agent needs anyway).
const layerInfoName = ".oneagent-csi-layer"

// LayerInfoPath is the record file of a tenant layer.
func (l Layout) LayerInfoPath(tenant, rev string) string {
	return filepath.Join(l.TenantLayer(tenant, rev), layerInfoName)
}

// LayerInfoName is the file name of the record inside a layer dir.
func (l Layout) LayerInfoName() string { return layerInfoName }

// ReadLayerInfo reads the record of an installed tenant layer; an error means
// the layer is partial or foreign.
func ReadLayerInfo(fs afero.Fs, l Layout, tenant, rev string) (TenantLayer, error) {
	var lay TenantLayer
	data, err := afero.ReadFile(fs, l.LayerInfoPath(tenant, rev))
	if err != nil {
		return lay, err
	}
	if err := json.Unmarshal(data, &lay); err != nil {
		return lay, fmt.Errorf("decode %s: %w", l.LayerInfoPath(tenant, rev), err)
	}
	if lay.Tenant != tenant || lay.Rev != rev {
		return lay, fmt.Errorf("layer record %s names %s/%s", l.LayerInfoPath(tenant, rev), lay.Tenant, lay.Rev)
	}
	return lay, nil
}

func jsonUnmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
