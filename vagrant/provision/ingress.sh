#!/bin/sh
# Provision an srmig ingress: its agent config (the ingress role programs H.Encaps from the VM state
# database). Shared by the Vagrant client and the namespace testbed's client (srmig demo --libvirt).
#
# Environment (defaults in brackets):
#   SRMIG_NAME        ingress name, unique [hostname]
#   SRMIG_INTERFACE   interface towards the fabric [required]
#   SRMIG_GATEWAY     next hop on it [required]
#   SRMIG_ENCAP       bpf (srmig's H.Encaps on SRMIG_INTERFACE's egress: any kernel) or kernel (seg6 routes:
#                     needs a kernel with SRv6 lwtunnels) [bpf]
#   SRMIG_DB, SRMIG_DB_PATH, SRMIG_ETCD, SRMIG_ETCD_CA, SRMIG_ETCD_CERT, SRMIG_ETCD_KEY, SRMIG_ETCD_INSECURE,
#   SRMIG_ETCD_USER, SRMIG_ETCD_PASSWORD_FILE, SRMIG_SOCKET, SRMIG_METRICS, SRMIG_CONFIG: as in host.sh
set -eu
: "${SRMIG_INTERFACE:?set SRMIG_INTERFACE}" "${SRMIG_GATEWAY:?set SRMIG_GATEWAY}"
NAME=${SRMIG_NAME:-$(hostname)}
CONFIG=${SRMIG_CONFIG:-/etc/srmig/agent.toml}
endpoints=""
for x in ${SRMIG_ETCD:-https://127.0.0.1:2379}; do endpoints="$endpoints${endpoints:+, }\"$x\""; done
toml_opt() {  # key value -> key = "value" and a newline, nothing when value is empty
    [ -z "$2" ] || printf '%s = "%s"\n' "$1" "$2"
}
# etcd's mutual TLS (https:// endpoints): the CA, this agent's certificate and key; its etcd user
db_tls=$(toml_opt ca_file "${SRMIG_ETCD_CA:-}"; toml_opt cert_file "${SRMIG_ETCD_CERT:-}"
         toml_opt key_file "${SRMIG_ETCD_KEY:-}"; toml_opt user "${SRMIG_ETCD_USER:-}"
         toml_opt password_file "${SRMIG_ETCD_PASSWORD_FILE:-}")
db_tls=${db_tls:+$db_tls
}
mkdir -p "$(dirname "$CONFIG")"
cat > "$CONFIG.tmp" <<TOML
# written by vagrant/provision/ingress.sh
[ingress]
name = "$NAME"
interface = "$SRMIG_INTERFACE"
gateway = "$SRMIG_GATEWAY"
encap = "${SRMIG_ENCAP:-bpf}"

[db]
backend = "${SRMIG_DB:-embedded}"
path = "${SRMIG_DB_PATH:-/var/lib/srmig/state.db}"
endpoints = [$endpoints]
${db_tls}insecure = ${SRMIG_ETCD_INSECURE:-false}

[hook]
socket = "${SRMIG_SOCKET:-/run/srmig/agent.sock}"

[metrics]
listen = "${SRMIG_METRICS-127.0.0.1:9478}"
TOML
mv "$CONFIG.tmp" "$CONFIG"
echo "srmig ingress $NAME: $CONFIG written"
