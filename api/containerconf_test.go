package api

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestParseContainers(t *testing.T) {
	var entries []string
	var first64 []Container
	for i := range MaxContainers + 1 {
		entries = append(entries, fmt.Sprintf("c%d=img", i))
		if i < MaxContainers {
			first64 = append(first64, Container{fmt.Sprintf("c%d", i), "img"})
		}
	}
	many := strings.Join(entries, ",")
	tests := []struct {
		name    string
		in      string
		want    []Container
		wantErr string
	}{
		{"empty", "", nil, ""},
		{"one", "shop=nginx:1.27", []Container{{"shop", "nginx:1.27"}}, ""},
		{"digest", "shop=r.example.com:5000/a/b@sha256:0123", []Container{{"shop", "r.example.com:5000/a/b@sha256:0123"}}, ""},
		{"no image", "shop=", nil, "entry 1 (shop): image"},
		{"no equals", "shop", nil, "want name=image"},
		{"bad name kept the rest", "Shop=x,cart=y", []Container{{"cart", "y"}}, "not a DNS-1123 label"},
		{"newline in image", "shop=a\nk8s_poduid evil", nil, "image must be"},
		{"space in image", "shop=a b", nil, "image must be"},
		{"twice", "shop=a,shop=b", []Container{{"shop", "a"}}, "listed twice"},
		{"too many", many, first64, "more than 64"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseContainers(tc.in)
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			var fe *FieldError
			if err != nil && (!errors.As(err, &fe) || fe.Field != AttrContainers) {
				t.Fatalf("err = %#v, want a FieldError naming %s", err, AttrContainers)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestFormatContainersRoundTrips(t *testing.T) {
	in := []Container{{"shop", "nginx:1.27"}, {"cart", "r.example.com/cart@sha256:ab"}}
	got, err := ParseContainers(FormatContainers(in))
	if err != nil || !reflect.DeepEqual(got, in) {
		t.Fatalf("got %+v, %v", got, err)
	}
}

func TestContainerConf(t *testing.T) {
	got := string(ContainerConf(Container{"shop", "nginx:1.27"}, PodInfo{Name: "shop-1", UID: "u-1", Namespace: "ns", NodeName: "node\nk8s_poduid x"}))
	want := "[container]\ncontainerName shop\nimageName nginx:1.27\nk8s_fullpodname shop-1\nk8s_poduid u-1\n" +
		"k8s_containername shop\nk8s_namespace ns\nk8s_node_name node k8s_poduid x\n"
	if got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
}
