package storage

import (
	"testing"

	"k8s.io/mount-utils"
)

func TestFindMountRefsVolumeDirs(t *testing.T) {
	l, _ := NewLayout("/data")
	mounts := []mount.MountInfo{
		{MountPoint: "/", Root: "/", Major: 8, Minor: 1, FsType: "ext4"},
		{MountPoint: "/pods/rw/mount", FsType: "overlay", SuperOptions: []string{"lowerdir=/data/tenants/prod/r1-x:/data/artifacts/" + idA,
			"upperdir=/data/volumes/rw/upper", "workdir=/data/volumes/rw/work"}},
		{MountPoint: "/pods/conf/mount", FsType: "overlay", SuperOptions: []string{"ro",
			"lowerdir=/data/volumes/conf/containers:/data/tenants/prod/r1-x:/data/artifacts/" + idA}},
		{MountPoint: "/pods/failed/mount", FsType: "overlay", SuperOptions: []string{"ro", "lowerdir=/data/volumes/failed/containers:/data/empty"}},
	}
	refs := FindMountRefs(l, mounts)
	for _, dir := range []string{"rw", "conf", "failed"} {
		if !refs.VolumeDirs[dir] {
			t.Errorf("volumes/%s is used by a mount but not in VolumeDirs %v", dir, refs.VolumeDirs)
		}
	}
	if refs.Artifacts[idA] != 2 || refs.Layers[LayerRef("prod", "r1-x")] != 2 {
		t.Errorf("refs %+v", refs)
	}
}
