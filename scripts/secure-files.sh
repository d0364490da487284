#!/usr/bin/env bash
# Makes what a secure stack needs, in DIR (default ./data/secure), with openssl; files that
# exist are kept, so running it again changes nothing:
#   ca.pem ca-key.pem            a certificate authority (for development: keep the key safe)
#   server.pem server-key.pem    the servers' certificate, for 127.0.0.1 and localhost
#   client.pem client-key.pem    a client certificate, subject CN=shop-client
#   tokens                       the servers' tokens file (SHA-256 hashes only)
#   tokens.env                   the tokens themselves: SHOP_WRITER_TOKEN, SHOP_READER_TOKEN,
#                                SHOP_ADMIN_TOKEN (give each to whoever needs it)
#   nats.conf nats.env           nats-server users `command` and `query` with their
#                                permissions (scripts/nats-users.conf.in) and random
#                                passwords, and TLS
# Usage: scripts/secure-files.sh [DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-data/secure}"
command -v openssl >/dev/null || { echo "openssl is needed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"
umask 077

random() { openssl rand -hex 24; }
sha256() { printf '%s' "$1" | openssl dgst -sha256 -r | cut -d' ' -f1; }

if [ ! -f ca.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/CN=shop development CA" -keyout ca-key.pem -out ca.pem 2>/dev/null
fi
issue() { # name subject extensions
  [ -f "$1.pem" ] && return
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
    -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 365 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server "/CN=shop server" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
issue client "/CN=shop-client" "extendedKeyUsage=clientAuth"

if [ ! -f tokens.env ]; then
  writer="$(random)"; reader="$(random)"; admin="$(random)"
  cat >tokens.env <<EOF
SHOP_WRITER_TOKEN=$writer
SHOP_READER_TOKEN=$reader
SHOP_ADMIN_TOKEN=$admin
EOF
  cat >tokens <<EOF
# ROLE SHA256_HEX_OF_TOKEN [NAME]: the name is the actor recorded in the events.
writer $(sha256 "$writer") orders-app
reader $(sha256 "$reader") reporting
admin $(sha256 "$admin") operator
# ROLE cert:SUBJECT: a client certificate's subject (mTLS), used when no token is sent.
reader cert:CN=shop-client
EOF
fi

if [ ! -f nats.env ]; then
  cat >nats.env <<EOF
SHOP_NATS_COMMAND_PASSWORD=$(random)
SHOP_NATS_QUERY_PASSWORD=$(random)
EOF
fi
# shellcheck disable=SC1091
. ./nats.env
tls_block="tls {
  cert_file: \"$PWD/server.pem\"
  key_file: \"$PWD/server-key.pem\"
}"
template="$(cat "$root/scripts/nats-users.conf.in")"
template="${template//@TLS@/$tls_block}"
template="${template//@COMMAND_PASSWORD@/$SHOP_NATS_COMMAND_PASSWORD}"
printf '%s\n' "${template//@QUERY_PASSWORD@/$SHOP_NATS_QUERY_PASSWORD}" >nats.conf
echo "$PWD"
