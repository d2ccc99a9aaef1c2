package api

import (
	"errors"
	"reflect"
	"testing"
	"time"
)

func TestParseVolumeAttributes(t *testing.T) {
	tests := []struct {
		name  string
		in    map[string]string
		want  VolumeAttributes
		field string
	}{
		{"defaults", map[string]string{}, VolumeAttributes{Mode: ModeApp, RetryTimeout: DefaultRetryTimeout}, ""},
		{"all set", map[string]string{"mode": "app", "dynakube": "prod", "version": "1.311.72.20250410-123003", "retryTimeout": "90s", "writable": "true",
			PodNameKey: "p", PodNamespaceKey: "ns", PodUIDKey: "u", ServiceAccountKey: "sa"},
			VolumeAttributes{Mode: ModeApp, Tenant: "prod", Version: "1.311.72.20250410-123003", RetryTimeout: 90 * time.Second, Writable: true,
				PodName: "p", PodNamespace: "ns", PodUID: "u", ServiceAccount: "sa"}, ""},
		{"tenant alias", map[string]string{"tenant": "prod"}, VolumeAttributes{Mode: ModeApp, Tenant: "prod", RetryTimeout: DefaultRetryTimeout}, ""},
		{"same tenant twice", map[string]string{"tenant": "prod", "dynakube": "prod"}, VolumeAttributes{Mode: ModeApp, Tenant: "prod", RetryTimeout: DefaultRetryTimeout}, ""},
		{"latest", map[string]string{"version": "latest"}, VolumeAttributes{Mode: ModeApp, Version: "latest", RetryTimeout: DefaultRetryTimeout}, ""},
		{"unknown keys ignored", map[string]string{"future": "x"}, VolumeAttributes{Mode: ModeApp, RetryTimeout: DefaultRetryTimeout}, ""},
		{"bad mode", map[string]string{"mode": "App"}, VolumeAttributes{}, AttrMode},
		{"conflicting tenants", map[string]string{"tenant": "a", "dynakube": "b"}, VolumeAttributes{}, AttrTenant},
		{"bad tenant", map[string]string{"dynakube": "../etc"}, VolumeAttributes{}, AttrDynakube},
		{"bad alias tenant", map[string]string{"tenant": "UPPER"}, VolumeAttributes{}, AttrTenant},
		{"long tenant", map[string]string{"dynakube": "a234567890123456789012345678901234567890123456789012345678901234"}, VolumeAttributes{}, AttrDynakube},
		{"bad version", map[string]string{"version": "1.2"}, VolumeAttributes{}, AttrVersion},
		{"version with host", map[string]string{"mode": "host", "version": "1.2.3"}, VolumeAttributes{}, AttrVersion},
		{"bad timeout", map[string]string{"retryTimeout": "10"}, VolumeAttributes{}, AttrRetryTimeout},
		{"negative timeout", map[string]string{"retryTimeout": "-1m"}, VolumeAttributes{}, AttrRetryTimeout},
		{"bad writable", map[string]string{"writable": "yes"}, VolumeAttributes{}, AttrWritable},
		{"writable host", map[string]string{"mode": "host", "writable": "true"}, VolumeAttributes{}, AttrWritable},
		{"containers", map[string]string{"containers": "shop=registry.example.com/shop:1.2@sha256:abc,cart=cart"},
			VolumeAttributes{Mode: ModeApp, RetryTimeout: DefaultRetryTimeout,
				Containers: []Container{{"shop", "registry.example.com/shop:1.2@sha256:abc"}, {"cart", "cart"}}}, ""},
		{"bad containers", map[string]string{"containers": "shop"}, VolumeAttributes{}, AttrContainers},
		{"containers with host", map[string]string{"mode": "host", "containers": "shop=shop"}, VolumeAttributes{}, AttrContainers},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseVolumeAttributes(tc.in)
			if tc.field != "" {
				var fe *FieldError
				if !errors.As(err, &fe) || fe.Field != tc.field {
					t.Fatalf("err = %v, want a FieldError for %s", err, tc.field)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}
