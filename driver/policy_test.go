package driver

import (
	"errors"
	"testing"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
)

func TestCheckTenantPolicy(t *testing.T) {
	const v1, v2, v3 = "1.311.72.20250410-123003", "1.313.40.20250601-080000", "1.309.66.20250301-101500"
	tests := []struct {
		name   string
		tenant provisioner.Tenant
		req    policyRequest
		ok     bool
	}{
		{"no policy: anything goes but writable", provisioner.Tenant{}, policyRequest{namespace: "x", pin: v1}, true},
		{"writable refused by default", provisioner.Tenant{}, policyRequest{namespace: "x", writable: true}, false},
		{"writable allowed", provisioner.Tenant{AllowWritable: true}, policyRequest{namespace: "x", writable: true}, true},
		{"namespace by name", provisioner.Tenant{Namespaces: []string{"shop"}}, policyRequest{namespace: "shop"}, true},
		{"namespace by glob", provisioner.Tenant{Namespaces: []string{"team-a-*"}}, policyRequest{namespace: "team-a-web"}, true},
		{"namespace outside the list", provisioner.Tenant{Namespaces: []string{"team-a-*", "shop"}}, policyRequest{namespace: "team-b"}, false},
		{"latest is no pin", provisioner.Tenant{VersionPins: []string{"none"}}, policyRequest{pin: "latest"}, true},
		{"pins: none", provisioner.Tenant{VersionPins: []string{"none"}}, policyRequest{pin: v1}, false},
		{"pins: any", provisioner.Tenant{VersionPins: []string{"any"}}, policyRequest{pin: v1}, true},
		{"pins: listed", provisioner.Tenant{VersionPins: []string{v1, v2}}, policyRequest{pin: v2}, true},
		{"pins: not listed", provisioner.Tenant{VersionPins: []string{v1}}, policyRequest{pin: v2}, false},
		{"max pinned: room", provisioner.Tenant{MaxPinnedVersions: 2}, policyRequest{pin: v2, pinnedInUse: []string{v1}}, true},
		{"max pinned: a version in use", provisioner.Tenant{MaxPinnedVersions: 2}, policyRequest{pin: v1, pinnedInUse: []string{v1, v2}}, true},
		{"max pinned: full", provisioner.Tenant{MaxPinnedVersions: 2}, policyRequest{pin: v3, pinnedInUse: []string{v1, v2}}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.tenant.Name = "prod"
			err := checkTenantPolicy(tc.tenant, tc.req)
			if (err == nil) != tc.ok || (err != nil && !errors.Is(err, errRefusedByPolicy)) {
				t.Fatalf("err = %v, want ok=%t", err, tc.ok)
			}
		})
	}
}

func TestValidateTenantPolicy(t *testing.T) {
	for _, bad := range []provisioner.Tenant{
		{Namespaces: []string{"team-["}},
		{VersionPins: []string{"any", "none"}},
		{VersionPins: []string{"newest"}},
		{MaxPinnedVersions: -1},
	} {
		if err := ValidateTenantPolicy(bad); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	if err := ValidateTenantPolicy(provisioner.Tenant{Namespaces: []string{"a", "b-*"}, VersionPins: []string{"1.311.72.20250410-123003"}}); err != nil {
		t.Error(err)
	}
}
