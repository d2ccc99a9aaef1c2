package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/spf13/afero"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// NodeGetInfo returns the node id; no topology, no volume limit.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.opts.NodeID}, nil
}

// NodeGetCapabilities is empty: no staging, no stats (DESIGN §4).
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// publishRequest is a validated NodePublishVolumeRequest.
type publishRequest struct {
	volumeID string
	target   string
	readOnly bool
	attrs    api.VolumeAttributes
	// attrErr is the first invalid attribute. In app mode it makes the
	// volume fail open at once (no retry can fix it); in host mode it is
	// returned as InvalidArgument.
	attrErr error
	// seLinuxContext is the context= mount option kubelet passes when the
	// CSIDriver has seLinuxMount: true and the pod has an SELinux label
	// (empty otherwise).
	seLinuxContext string
}

// validatePublish checks fields in the order csi-sanity expects (volume id,
// target path, capability); errors there are InvalidArgument. Attributes are
// checked after that and kept in attrErr.
func (d *Driver) validatePublish(req *csi.NodePublishVolumeRequest) (publishRequest, error) {
	r := publishRequest{volumeID: req.GetVolumeId(), target: req.GetTargetPath(), readOnly: req.GetReadonly()}
	if r.volumeID == "" {
		return r, invalid("volume_id", "must be set")
	}
	if err := d.validateTarget(r.target); err != nil {
		return r, err
	}
	vc := req.GetVolumeCapability()
	if vc == nil {
		return r, invalid("volume_capability", "must be set")
	}
	if vc.GetBlock() != nil {
		return r, invalid("volume_capability.block", "block volumes are not supported, use a mount volume")
	}
	if vc.GetMount() == nil {
		return r, invalid("volume_capability.mount", "must be set")
	}
	for _, f := range vc.GetMount().GetMountFlags() {
		// Only the SELinux context is taken; the driver chooses every
		// other mount option itself.
		if strings.HasPrefix(f, "context=") {
			if strings.ContainsAny(f, "\x00\n") || len(f) > 512 {
				return r, invalid("volume_capability.mount.mount_flags", "the context= option is malformed")
			}
			r.seLinuxContext = f
		}
	}
	r.attrs, r.attrErr = api.ParseVolumeAttributes(req.GetVolumeContext())
	if r.attrErr != nil {
		return r, nil
	}
	if r.attrs.Tenant == "" {
		r.attrs.Tenant = d.opts.Provisioner.DefaultTenant()
		if r.attrs.Tenant == "" {
			r.attrErr = fmt.Errorf("volume_context[%q] must name a tenant: several tenants are configured: %w",
				api.AttrDynakube, provisioner.ErrUnknownTenant)
			return r, nil
		}
	}
	if r.attrs.Writable && r.readOnly {
		r.attrErr = invalid("volume_context[\"writable\"]", "\"true\" conflicts with a read-only volume (readOnly: true)")
	}
	return r, nil
}

// validateTarget accepts only the paths kubelet gives CSI volumes:
// <kubeletDir>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/<leaf>
// (kubelet's leaf is "mount"; csi-sanity's is "target"). So neither publish
// nor unpublish can be pointed at anything else on the node (the index, the
// data dir, a host path).
func (d *Driver) validateTarget(target string) error {
	if target == "" {
		return invalid("target_path", "must be set")
	}
	if !filepath.IsAbs(target) || filepath.Clean(target) != target {
		return invalid("target_path", fmt.Sprintf("%q must be an absolute, clean path", target))
	}
	rel, err := filepath.Rel(d.opts.KubeletDir, target)
	parts := strings.Split(rel, "/")
	if err != nil || len(parts) != 6 || parts[0] != "pods" || parts[2] != "volumes" ||
		parts[3] != "kubernetes.io~csi" || parts[1] == ".." || parts[4] == ".." || parts[5] == ".." {
		return invalid("target_path", fmt.Sprintf("%q is not a kubelet CSI volume path (%s/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount; set kubeletDir in the node config if kubelet uses another root dir)",
			target, d.opts.KubeletDir))
	}
	return nil
}

// NodePublishVolume mounts the code module at the target (DESIGN §4).
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (_ *csi.NodePublishVolumeResponse, err error) {
	start := d.opts.Now()
	mode := "unknown"
	d.metrics.inFlight.WithLabelValues("publish").Inc()
	defer func() {
		d.metrics.inFlight.WithLabelValues("publish").Dec()
		d.metrics.ops.WithLabelValues("publish", mode, status.Code(err).String()).Observe(d.opts.Now().Sub(start).Seconds())
	}()
	r, err := d.validatePublish(req)
	if err != nil {
		return nil, toStatus(err)
	}
	mode = string(r.attrs.Mode)
	log := klog.FromContext(ctx).WithValues("volumeID", r.volumeID, "target", r.target,
		"pod", r.attrs.PodNamespace+"/"+r.attrs.PodName, "tenant", r.attrs.Tenant, "mode", r.attrs.Mode)
	ctx = klog.NewContext(ctx, log)
	unlock, ok := d.locks.tryLock(r.target)
	if !ok {
		return nil, toStatus(fmt.Errorf("publish %s: %w", r.target, errBusy))
	}
	defer unlock()
	if err := d.publish(ctx, r); err != nil {
		return nil, toStatus(err)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) isMounted(target string) (bool, error) {
	notMnt, err := d.opts.Mounter.IsLikelyNotMountPoint(target)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("check mount point %s: %w", target, err)
	}
	return !notMnt, nil
}

func (d *Driver) publish(ctx context.Context, r publishRequest) error {
	log := klog.FromContext(ctx)
	if fi, err := os.Lstat(r.target); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		return invalid("target_path", fmt.Sprintf("%q is a symlink; kubelet creates a directory or nothing", r.target))
	}
	mounted, err := d.isMounted(r.target)
	if err != nil {
		return err
	}
	if mounted {
		log.V(2).Info("already published")
		return nil
	}
	now := d.opts.Now()
	rec, err := d.opts.Index.GetVolume(r.volumeID)
	switch {
	case errors.Is(err, storage.ErrNotFound) || (err == nil && rec.TargetPath != r.target):
		rec = storage.Volume{ID: r.volumeID, FirstAttempt: now}
	case err != nil:
		// The index is an aid, not the truth: without it the attempt
		// counts from now, and the pod is still served or fails open.
		log.Error(err, "reading volume record")
		rec = storage.Volume{ID: r.volumeID, FirstAttempt: now}
	}
	rec.TargetPath, rec.Mode, rec.Tenant, rec.Writable = r.target, r.attrs.Mode, r.attrs.Tenant, r.attrs.Writable
	rec.ReadOnly = !r.attrs.Writable
	rec.PodName, rec.PodNamespace, rec.PodUID, rec.ServiceAccount = r.attrs.PodName, r.attrs.PodNamespace, r.attrs.PodUID, r.attrs.ServiceAccount
	rec.Pinned = r.attrs.Version != "" && r.attrs.Version != "latest"

	cause := r.attrErr
	if cause == nil {
		cause = d.checkPolicy(r)
	}
	if r.attrs.Mode == api.ModeHost {
		if cause != nil {
			return cause
		}
		return d.publishHost(ctx, r, rec)
	}
	if cause == nil {
		if cause = d.publishApp(ctx, r, rec); cause == nil {
			return nil
		}
	}
	// App mode: whatever failed, the pod is never kept waiting longer than
	// its retryTimeout, and not at all for what no retry can fix.
	waited := now.Sub(rec.FirstAttempt)
	if reason := finalFailure(cause); reason != "" {
		return d.failOpen(ctx, r, rec, cause, reason, waited)
	}
	if waited >= r.attrs.RetryTimeout {
		return d.failOpen(ctx, r, rec, cause, FailOpenRetryTimeout, waited)
	}
	if rec.State == "" || rec.Reason != cause.Error() {
		rec.State, rec.Reason = storage.VolumePending, cause.Error()
		if err := d.opts.Index.PutVolume(rec); err != nil {
			log.Error(err, "recording pending volume")
		}
	}
	log.Info("agent not available yet, kubelet will retry", "waited", waited.Round(time.Second),
		"failOpenIn", (r.attrs.RetryTimeout - waited).Round(time.Second), "err", cause)
	return fmt.Errorf("volume %s: %w", r.volumeID, cause)
}

// Reasons a volume fails open, the label values of
// oneagent_csi_fail_open_total{reason}.
const (
	// FailOpenRetryTimeout: retryTimeout passed without the agent.
	FailOpenRetryTimeout = "retry_timeout"
	// FailOpenInvalidAttributes: a volume attribute is invalid.
	FailOpenInvalidAttributes = "invalid_attributes"
	// FailOpenUnknownTenant: the volume names a tenant the node does not know.
	FailOpenUnknownTenant = "unknown_tenant"
	// FailOpenVersionNotFound: the tenant does not have the version.
	FailOpenVersionNotFound = "version_not_found"
	// FailOpenRefusedByPolicy: the tenant's policy refuses the volume
	// (namespace, version pin, writable).
	FailOpenRefusedByPolicy = "refused_by_policy"
)

// checkPolicy applies the tenant's policy to the request; an unknown tenant
// is left to the provisioner (ErrUnknownTenant).
func (d *Driver) checkPolicy(r publishRequest) error {
	t, ok := d.opts.Provisioner.TenantConfig(r.attrs.Tenant)
	if !ok {
		return nil
	}
	req := policyRequest{namespace: r.attrs.PodNamespace, pin: r.attrs.Version, writable: r.attrs.Writable}
	if t.MaxPinnedVersions > 0 && req.pin != "" && req.pin != "latest" {
		req.pinnedInUse = d.pinnedInUse(r.attrs.Tenant, r.volumeID)
	}
	return checkTenantPolicy(t, req)
}

// pinnedInUse lists the distinct versions of tenant that other volumes on
// this node pin.
func (d *Driver) pinnedInUse(tenant, exceptVolume string) []string {
	vols, err := d.opts.Index.ListVolumes()
	if err != nil {
		return nil
	}
	var out []string
	for _, v := range vols {
		if v.Tenant == tenant && v.Pinned && v.ID != exceptVolume && v.Version != "" && v.State != storage.VolumeFailedOpen &&
			!slices.Contains(out, v.Version) {
			out = append(out, v.Version)
		}
	}
	return out
}

// finalFailure returns the fail-open reason of an error no retry can fix, or
// "" for errors that may go away.
func finalFailure(err error) string {
	var fe *api.FieldError
	switch {
	case errors.Is(err, provisioner.ErrUnknownTenant):
		return FailOpenUnknownTenant
	case errors.As(err, &fe), errors.Is(err, errInvalid):
		return FailOpenInvalidAttributes
	case errors.Is(err, provisioner.ErrNotFound):
		return FailOpenVersionNotFound
	case errors.Is(err, errRefusedByPolicy):
		return FailOpenRefusedByPolicy
	}
	return ""
}

// maxDownloadWaiters is how many publishes may wait up to PublishWait for a
// download at once; further ones wait at most busyWait and return
// Unavailable (kubelet retries with backoff), so that waiting publishes
// never hold all of the MaxConnections that other volumes need.
const (
	maxDownloadWaiters = 16
	busyWait           = 100 * time.Millisecond
)

// publishApp mounts the tenant layer over the code module at the target.
func (d *Driver) publishApp(ctx context.Context, r publishRequest, rec storage.Volume) error {
	wait := busyWait
	select {
	case d.waiters <- struct{}{}:
		wait = d.opts.PublishWait
		defer func() { <-d.waiters }()
	default:
	}
	pctx, cancel := context.WithTimeout(ctx, wait)
	prep, err := d.opts.Provisioner.Prepare(pctx, r.attrs.Tenant, r.attrs.Version)
	cancel()
	if err != nil {
		return err
	}
	l := d.opts.Layout
	lowers := []string{l.Abs(prep.LayerDir), l.Abs(prep.ArtifactDir)}
	ownLayers := r.attrs.Writable || len(r.attrs.Containers) > 0
	if ownLayers {
		if err := d.makeVolumeLayers(r, r.attrs.Writable); err != nil {
			return err
		}
	}
	if len(r.attrs.Containers) > 0 {
		lowers = append([]string{l.Abs(l.VolumeContainers(r.volumeID))}, lowers...)
	}
	options := []string{"lowerdir=" + strings.Join(lowers, ":")}
	if r.attrs.Writable {
		options = append(options, "upperdir="+l.Abs(l.VolumeUpper(r.volumeID)), "workdir="+l.Abs(l.VolumeWork(r.volumeID)))
	} else {
		options = append(options, "ro")
	}
	options = append(options, "nodev", "nosuid")
	if r.seLinuxContext != "" {
		// Files served to a confined container must carry its label, or
		// the loader cannot map the agent library.
		options = append(options, r.seLinuxContext)
	}
	if err := d.mountAt(r.target, "overlay", "overlay", options); err != nil {
		if ownLayers {
			d.removeVolumeLayers(r.volumeID)
		}
		return err
	}
	rec.State, rec.Reason, rec.PublishedAt = storage.VolumePublished, "", d.opts.Now()
	rec.Version, rec.ArtifactID, rec.LayerRev = prep.Version, prep.Artifact.ID, prep.Layer.Rev
	if err := d.opts.Index.PutVolume(rec); err != nil {
		// The mount is the truth; reconcile adopts it if the record is lost.
		klog.FromContext(ctx).Error(err, "recording published volume")
	}
	klog.FromContext(ctx).V(1).Info("published", "version", prep.Version, "artifact", prep.Artifact.ID, "rev", prep.Layer.Rev)
	return nil
}

// containersLayerSize caps the tmpfs of a volume that holds only its
// containers' configuration (at most api.MaxContainers files of a page).
const containersLayerSize = 1 << 20

// makeVolumeLayers makes volumes/<id>/ a tmpfs holding the volume's own
// layers: with writable, the overlay's upper and work dirs, capped at the
// tenant's writableSize, so that writes beyond the cap fail with ENOSPC
// instead of filling the node's disk and the pages count against the
// writing pod's memory; with containers listed, their container.conf files.
// A tmpfs, not the data disk, so that a full disk never keeps a pod from
// starting (the app containers' subPath mounts need these files). On
// failure nothing is left.
func (d *Driver) makeVolumeLayers(r publishRequest, writable bool) error {
	l := d.opts.Layout
	size := int64(containersLayerSize)
	if writable {
		t, _ := d.opts.Provisioner.TenantConfig(r.attrs.Tenant)
		var err error
		if size, err = writableSize(t); err != nil {
			return err
		}
	}
	dir := l.Volume(r.volumeID)
	if err := d.opts.Fs.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	mounted, err := d.isMounted(l.Abs(dir))
	if err != nil {
		return err
	}
	if !mounted {
		opts := []string{fmt.Sprintf("size=%d", size), "mode=0755", "nodev", "nosuid", "noexec"}
		if writable {
			// The agent's files are executable; a writable upper layer
			// must be able to hold copies of them.
			opts = opts[:len(opts)-1]
		}
		if err := d.opts.Mounter.Mount("oneagent-csi-volume", l.Abs(dir), "tmpfs", opts); err != nil {
			_ = d.opts.Fs.RemoveAll(dir)
			return fmt.Errorf("mount the layers of %s: %w", r.volumeID, err)
		}
	}
	var subs []string
	if writable {
		subs = append(subs, l.VolumeUpper(r.volumeID), l.VolumeWork(r.volumeID))
	}
	for _, sub := range subs {
		if err := d.opts.Fs.MkdirAll(sub, 0o755); err != nil {
			d.removeVolumeLayers(r.volumeID)
			return fmt.Errorf("create %s: %w", sub, err)
		}
	}
	if err := d.writeContainerConfs(r); err != nil {
		d.removeVolumeLayers(r.volumeID)
		return err
	}
	return nil
}

// writeContainerConfs writes the container.conf of every container the
// volume lists (api.ContainerConfRelativePath under VolumeContainers).
func (d *Driver) writeContainerConfs(r publishRequest) error {
	if len(r.attrs.Containers) == 0 {
		return nil
	}
	pod := api.PodInfo{Name: r.attrs.PodName, UID: r.attrs.PodUID, Namespace: r.attrs.PodNamespace, NodeName: d.opts.NodeID}
	base := d.opts.Layout.VolumeContainers(r.volumeID)
	for _, c := range r.attrs.Containers {
		file := filepath.Join(base, api.ContainerConfRelativePath(c.Name))
		if err := d.opts.Fs.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			return fmt.Errorf("container %s: %w", c.Name, err)
		}
		if err := afero.WriteFile(d.opts.Fs, file, api.ContainerConf(c, pod), 0o644); err != nil {
			return fmt.Errorf("container %s: write container.conf: %w", c.Name, err)
		}
	}
	return nil
}

// removeVolumeLayers unmounts a volume's own layers and removes their dir;
// it is not an error when there are none.
func (d *Driver) removeVolumeLayers(volumeID string) {
	dir := d.opts.Layout.Volume(volumeID)
	_ = d.opts.Mounter.Unmount(d.opts.Layout.Abs(dir))
	_ = d.opts.Fs.RemoveAll(dir)
}

// mountAt creates target (kubelet leaves that to the driver) and mounts; on
// failure a target dir it created is removed again.
func (d *Driver) mountAt(target, source, fstype string, options []string) error {
	created := false
	if _, err := os.Lstat(target); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(target, 0o750); err != nil {
			return fmt.Errorf("create target %s: %w", target, err)
		}
		created = true
	}
	if err := d.opts.Mounter.Mount(source, target, fstype, options); err != nil {
		if created {
			_ = os.Remove(target)
		}
		return fmt.Errorf("mount %s: %w", target, err)
	}
	return nil
}

func (d *Driver) hostAllowed(attrs api.VolumeAttributes) bool {
	for _, rule := range d.opts.HostAllow {
		if rule.Namespace == attrs.PodNamespace &&
			(rule.ServiceAccount == "" || rule.ServiceAccount == "*" || rule.ServiceAccount == attrs.ServiceAccount) {
			return true
		}
	}
	return false
}

func (d *Driver) publishHost(ctx context.Context, r publishRequest, rec storage.Volume) error {
	if !d.hostAllowed(r.attrs) {
		return fmt.Errorf("pod %s/%s (service account %q): %w; add it to hostAllow in the node config",
			r.attrs.PodNamespace, r.attrs.PodName, r.attrs.ServiceAccount, errHostNotAllowed)
	}
	dir, err := d.opts.Provisioner.EnsureHostDir(r.attrs.Tenant)
	if err != nil {
		return err
	}
	options := []string{"bind", "nodev", "nosuid"}
	if r.readOnly {
		options = append(options, "ro")
	}
	if err := d.mountAt(r.target, d.opts.Layout.Abs(dir), "", options); err != nil {
		return err
	}
	rec.State, rec.PublishedAt, rec.ReadOnly = storage.VolumePublished, d.opts.Now(), r.readOnly
	if err := d.opts.Index.PutVolume(rec); err != nil {
		klog.FromContext(ctx).Error(err, "recording published volume")
	}
	return nil
}

// failOpen mounts an empty read-only dir so that the pod starts without the
// agent: after retryTimeout of failed attempts, or at once for what no retry
// can fix.
func (d *Driver) failOpen(ctx context.Context, r publishRequest, rec storage.Volume, cause error, reason string, waited time.Duration) error {
	l := d.opts.Layout
	if len(r.attrs.Containers) == 0 {
		if err := d.mountAt(r.target, l.Abs(l.Empty()), "", []string{"bind", "ro", "nodev", "nosuid"}); err != nil {
			return err
		}
	} else {
		// Without the agent, but with the containers' configuration: their
		// subPath mounts of it must find a file, or they cannot start.
		if err := d.makeVolumeLayers(r, false); err != nil {
			return fmt.Errorf("fail open: %w", err)
		}
		lower := l.Abs(l.VolumeContainers(r.volumeID)) + ":" + l.Abs(l.Empty())
		if err := d.mountAt(r.target, "overlay", "overlay", []string{"lowerdir=" + lower, "ro", "nodev", "nosuid"}); err != nil {
			d.removeVolumeLayers(r.volumeID)
			return err
		}
	}
	d.metrics.failOpen.WithLabelValues(reason).Inc()
	rec.State, rec.PublishedAt = storage.VolumeFailedOpen, d.opts.Now()
	if reason == FailOpenRetryTimeout {
		rec.Reason = "failed open after " + waited.Round(time.Second).String() + ": " + cause.Error()
	} else {
		rec.Reason = "failed open at once (" + reason + "): " + cause.Error()
	}
	if err := d.opts.Index.PutVolume(rec); err != nil {
		klog.FromContext(ctx).Error(err, "recording failed-open volume")
	}
	klog.FromContext(ctx).Error(cause, "FAILED OPEN: the pod starts without the agent", "reason", reason,
		"waited", waited.Round(time.Second), "retryTimeout", r.attrs.RetryTimeout)
	return nil
}

// NodeUnpublishVolume unmounts and removes the target and drops the record.
// It needs nothing but volume id and target, so it works for volumes whose
// record was lost; it is not an error when nothing is mounted or the target
// does not exist.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (_ *csi.NodeUnpublishVolumeResponse, err error) {
	start := d.opts.Now()
	d.metrics.inFlight.WithLabelValues("unpublish").Inc()
	defer func() {
		d.metrics.inFlight.WithLabelValues("unpublish").Dec()
		d.metrics.ops.WithLabelValues("unpublish", "", status.Code(err).String()).Observe(d.opts.Now().Sub(start).Seconds())
	}()
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if id == "" {
		return nil, toStatus(invalid("volume_id", "must be set"))
	}
	if err := d.validateTarget(target); err != nil {
		return nil, toStatus(err)
	}
	unlock, ok := d.locks.tryLock(target)
	if !ok {
		return nil, toStatus(fmt.Errorf("unpublish %s: %w", target, errBusy))
	}
	defer unlock()
	if err := d.unpublish(ctx, id, target); err != nil {
		return nil, toStatus(err)
	}
	if d.opts.AfterUnpublish != nil {
		d.opts.AfterUnpublish()
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) unpublish(ctx context.Context, id, target string) error {
	log := klog.FromContext(ctx).WithValues("volumeID", id, "target", target)
	// Unmount until nothing is stacked at the target any more.
	for i := 0; ; i++ {
		mounted, err := d.isMounted(target)
		if err != nil {
			return err
		}
		if !mounted {
			break
		}
		if i == 8 {
			return fmt.Errorf("%s is still mounted after %d unmounts: %w", target, i, errUnmount)
		}
		if err := d.opts.Mounter.Unmount(target); err != nil {
			return fmt.Errorf("%w: %w", errUnmount, err)
		}
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove target %s: %w", target, err)
	}
	if err := d.opts.Mounter.Unmount(d.opts.Layout.Abs(d.opts.Layout.Volume(id))); err != nil {
		return fmt.Errorf("%w: writable layer of %s: %w", errUnmount, id, err)
	}
	if err := d.opts.Fs.RemoveAll(d.opts.Layout.Volume(id)); err != nil {
		return fmt.Errorf("remove writable layer of %s: %w", id, err)
	}
	if err := d.opts.Index.DeleteVolume(id, target); err != nil {
		return fmt.Errorf("drop record of %s: %w", id, err)
	}
	log.V(1).Info("unpublished")
	return nil
}

// NodeStageVolume is not supported (no STAGE_UNSTAGE capability).
func (d *Driver) NodeStageVolume(context.Context, *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	return nil, status.Error(codes.Unimplemented, "staging is not supported")
}

// NodeUnstageVolume is not supported.
func (d *Driver) NodeUnstageVolume(context.Context, *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	return nil, status.Error(codes.Unimplemented, "staging is not supported")
}
