#!/bin/sh
# Container entry point: each STROKEGATE_<NAME>__FILE variable becomes STROKEGATE_<NAME> with the
# content of that file (compose and Kubernetes secrets are files; the "__FILE" suffix is Grafana's
# convention), then `strokegate "$@"` runs. Example: STROKEGATE_DATABASE_URL__FILE=/run/secrets/database_url.
set -eu
for name in $(env | sed -n 's/^\(STROKEGATE_[A-Z0-9_]*\)__FILE=.*/\1/p'); do
    eval "file=\${${name}__FILE}"
    if [ ! -r "$file" ]; then
        echo "strokegate: ${name}__FILE names $file, which cannot be read; mount the secret there" >&2
        exit 2
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}__FILE"
done
if [ "${1:-}" = "strokegate" ]; then
    shift
fi
exec strokegate "$@"
