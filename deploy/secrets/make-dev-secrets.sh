#!/usr/bin/env bash
# Make the secret files deploy/compose.yaml expects, for trying StrokeGate out: random passwords,
# a private test CA and a server certificate for StrokeGate signed by it. For production, put your
# hospital's certificates and your own passwords in the same files instead.
#   bash deploy/secrets/make-dev-secrets.sh [FOLDER]     (default: the folder of this script)
# Existing files are kept, so running it again changes nothing.
set -euo pipefail
out=${1:-$(dirname "$0")}
mkdir -p "$out/tls"
cd "$out"

secret() {  # NAME CONTENT: write a file only you and the containers' users can read
    [ -e "$1" ] && return 0
    (umask 077 && printf '%s\n' "$2" > "$1")
    chmod 0644 "$1"  # containers run as other users (StrokeGate 10001); keep the folder private
}
random() { openssl rand -hex 24; }

db_password=$(cat db_password 2>/dev/null || random)
secret db_password "$db_password"
secret database_url "postgresql://strokegate:${db_password}@postgres:5432/strokegate"
rabbit_password=$(sed -n 's/^default_pass = //p' rabbitmq_credentials.conf 2>/dev/null || true)
rabbit_password=${rabbit_password:-$(random)}
secret rabbitmq_credentials.conf "default_user = strokegate
default_pass = ${rabbit_password}"
secret broker_url "amqp://strokegate:${rabbit_password}@rabbitmq:5672//"
secret grafana_admin_password "$(random)"
# Prometheus's reader token: API tokens live in StrokeGate's database, so the token is made once the
# service runs (deploy/compose.yaml, top); until then the file is empty and the scrape is refused.
[ -e prometheus_token ] || secret prometheus_token ""

if [ ! -e tls/ca.crt ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=StrokeGate test CA" \
        -keyout tls/ca.key -out tls/ca.crt 2>/dev/null
fi
if [ ! -e tls/strokegate.crt ]; then
    openssl req -newkey rsa:3072 -nodes -subj "/CN=strokegate" \
        -keyout tls/strokegate.key -out tls/strokegate.csr 2>/dev/null
    printf 'subjectAltName=DNS:strokegate,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > tls/ext.cnf
    openssl x509 -req -in tls/strokegate.csr -CA tls/ca.crt -CAkey tls/ca.key -CAcreateserial -days 825 \
        -extfile tls/ext.cnf -out tls/strokegate.crt 2>/dev/null
    rm -f tls/strokegate.csr tls/ext.cnf
fi
chmod 0600 tls/ca.key
chmod 0644 tls/strokegate.key tls/strokegate.crt tls/ca.crt
chmod 0700 .
echo "secrets in $(pwd): database_url db_password broker_url rabbitmq_credentials.conf prometheus_token grafana_admin_password tls/"
