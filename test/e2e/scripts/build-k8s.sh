#!/usr/bin/env bash
# Builds kube-apiserver, etcd and kubelet from the Go module proxy through
# the tools module in test/e2e/tools (k8s.io/kubernetes cannot be
# `go install`ed: its go.mod replaces its staging modules). The binaries go
# to test/e2e/.cache/k8s-<k8s version>-<go version>/bin, which is kept
# between runs and ignored by git; a complete cache is reused as is.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
k8s=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$here/tools/go.mod")
gov=$(go env GOVERSION)
out=$here/.cache/k8s-$k8s-$gov/bin
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kubelet" ] && [ -x "$out/etcd" ]; then
  echo "$out"; exit 0
fi
mkdir -p "$out.tmp"
minor=${k8s#v1.}; minor=${minor%%.*}
ldf="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
cd "$here/tools"
start=$(date +%s)
go build -ldflags "$ldf" -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3 >&2
go build -ldflags "$ldf" -o "$out.tmp/kubelet" k8s.io/kubernetes/cmd/kubelet >&2
rm -rf "$out"; mv "$out.tmp" "$out"
echo "built kube-apiserver, etcd, kubelet $k8s in $(( $(date +%s) - start ))s" >&2
echo "$out"
