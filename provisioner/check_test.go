package provisioner_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

// The tenant check makes the driver's calls now and says which one fails.
func TestCheckTenants(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mutate   func(o *provisioner.Options)
		after    func(f *fixture)
		failStep string
		detail   string
	}{
		{"healthy latest", nil, nil, "", "latest is " + faketenant.DefaultVersions[1]},
		{"pinned version offered", func(o *provisioner.Options) { o.Tenants[0].Version = faketenant.DefaultVersions[0] }, nil, "", "is offered"},
		{"pinned version missing", func(o *provisioner.Options) { o.Tenants[0].Version = "1.1.1.20200101-000000" }, nil, "version", "not among the 2 versions"},
		{"token refused", nil, func(f *fixture) { f.srv.SetToken("rotated") }, "api", "PaaS token"},
		{"name does not resolve", func(o *provisioner.Options) { o.Tenants[0].APIURL = "https://tenant.invalid/api" }, nil, "dns", "tenant.invalid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, tc.mutate)
			if tc.after != nil {
				tc.after(f)
			}
			checks, err := f.prov.CheckTenants(context.Background(), "", 10*time.Second)
			if err != nil || len(checks) != 1 {
				t.Fatalf("checks %+v, %v", checks, err)
			}
			c := checks[0]
			if tc.failStep == "" {
				if !c.OK() || !strings.Contains(c.Steps[len(c.Steps)-1].Detail, tc.detail) {
					t.Fatalf("%+v", c)
				}
				return
			}
			last := c.Steps[len(c.Steps)-1]
			if c.OK() || last.OK || last.Name != tc.failStep || !strings.Contains(last.Detail, tc.detail) {
				t.Fatalf("want step %s to fail with %q: %+v", tc.failStep, tc.detail, c)
			}
		})
	}
	f := newFixture(t, nil)
	if _, err := f.prov.CheckTenants(context.Background(), "other", time.Second); !errors.Is(err, provisioner.ErrUnknownTenant) {
		t.Fatalf("unknown tenant: %v", err)
	}
}
