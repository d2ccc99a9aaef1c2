#!/usr/bin/env bash
# Builds kube-apiserver, kube-scheduler, kube-controller-manager, kube-proxy,
# etcd, kubelet, kubectl and helm from the Go module proxy through
# the tools module in test/e2e/tools (k8s.io/kubernetes cannot be
# `go install`ed: its go.mod replaces its staging modules). The binaries go
# to test/e2e/.cache/k8s-<k8s version>-<go version>/bin, which is kept
# between runs and ignored by git; a complete cache is reused as is.
set -euo pipefail
# helm is built from its own module (go install pkg@version), not the tools
# module: its Kubernetes libraries need not match the cluster's.
helm_version=v3.22.0
here=$(cd "$(dirname "$0")/.." && pwd)
k8s=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$here/tools/go.mod")
gov=$(go env GOVERSION)
out=$here/.cache/k8s-$k8s-$gov/bin
missing=()
for b in kube-apiserver kube-scheduler kube-controller-manager kube-proxy etcd kubelet kubectl helm; do [ -x "$out/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$out"; exit 0
fi
mkdir -p "$out.tmp"
[ -d "$out" ] && cp -a "$out/." "$out.tmp/"
minor=${k8s#v1.}; minor=${minor%%.*}
ldf="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
cd "$here/tools"
start=$(date +%s)
for b in "${missing[@]}"; do
  case $b in
    etcd) go build -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3 >&2 ;;
    helm) (cd / && GOBIN="$out.tmp" CGO_ENABLED=0 go install "helm.sh/helm/v3/cmd/helm@$helm_version" >&2) ;;
    *) go build -ldflags "$ldf" -o "$out.tmp/$b" "k8s.io/kubernetes/cmd/$b" >&2 ;;
  esac
done
rm -rf "$out"; mv "$out.tmp" "$out"
echo "built ${missing[*]} $k8s in $(( $(date +%s) - start ))s" >&2
echo "$out"
