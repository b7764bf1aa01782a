#!/bin/sh
# The Vagrant client: its fabric and management links, etcd (the VM state database every agent shares)
# listening on the fabric address with mutual TLS and authentication, as deployed (docs/operations.md,
# "Certificates for etcd", "Least privilege in etcd"), ingress.sh (the same script the namespace
# testbed's `srmig demo --libvirt` runs) and the ingress agent as a systemd unit. The probe runs here too
# (demo.sh). Idempotent; the Vagrantfile runs it at every `vagrant up`.
#
# Environment (set by the Vagrantfile), besides ingress.sh's own (SRMIG_NAME, SRMIG_GATEWAY, SRMIG_DB,
# SRMIG_ETCD, ...), which pass through:
#   SRMIG_FABRIC_MAC, SRMIG_FABRIC_ADDR   the fabric NIC (ingress.sh's SRMIG_INTERFACE) and its address
#   SRMIG_FABRIC_ADDR4  its IPv4 address/prefix: the probe's IPv4 source, where the VM's IPv4 replies come
#                       back natively [none]
#   SRMIG_MGMT_MAC, SRMIG_MGMT_ADDR       the management NIC (demo.sh drives the hypervisors' libvirtd on it)
#   SRMIG_ROUTES      "PREFIX=GATEWAY ..." on the fabric: each host's locator [none]
#   SRMIG_NEIGHBOURS  "ADDR=MAC ..." permanent neighbours on the fabric [none]
#   SRMIG_CONFIG      the agent's config [/etc/srmig/agent.toml]
#   SRMIG_PKI         etcd's CA and every agent's credentials, a directory each (lib.sh, etcd_pki): ours
#                     $SRMIG_PKI/$SRMIG_NAME, each hypervisor's $SRMIG_PKI/<host>, which the Vagrantfile
#                     hands to that hypervisor [/etc/srmig/pki]
#   SRMIG_HOSTS       the hypervisors' names: an etcd user and credentials each [none]
#   SRMIG_SERVICES    0: stop after the links, the credentials and the config, touching no system service
#                     (etcd, systemd units): what tests/test_vagrant.py runs in a network namespace [1]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
CONFIG=${SRMIG_CONFIG:-/etc/srmig/agent.toml}
UNIT=/etc/systemd/system/srmig-agent.service
SRMIG=$SRMIG_VENV/bin/srmig
[ -x "$SRMIG" ] || die "$SRMIG not found: run common.sh (./run setup) first"

# --- links ----------------------------------------------------------------------------------------------
links_setup

# --- etcd's credentials: the CA, etcd's certificate, a directory per agent and the operator's (root) ------
# openssl, as docs/operations.md shows; the CA's key stays here. etcd listens on the fabric address and on
# loopback, both in its certificate.
addr=${SRMIG_FABRIC_ADDR%/*}
PKI=${SRMIG_PKI:-/etc/srmig/pki}
# shellcheck disable=SC2086
etcd_pki "$PKI" "$addr 127.0.0.1" root "$SRMIG_NAME" ${SRMIG_HOSTS:-}
log "etcd credentials in $PKI: root $SRMIG_NAME ${SRMIG_HOSTS:-}"

# --- srmig ingress: config (one source of truth with the namespace testbed) -------------------------------
me=$PKI/$SRMIG_NAME
SRMIG_INTERFACE=$fabric SRMIG_CONFIG=$CONFIG SRMIG_ETCD_CA=$me/ca.pem SRMIG_ETCD_CERT=$me/cert.pem \
    SRMIG_ETCD_KEY=$me/key.pem SRMIG_ETCD_USER=$SRMIG_NAME SRMIG_ETCD_PASSWORD_FILE=$me/password \
    sh "$HERE/ingress.sh"
"$SRMIG" agent --config "$CONFIG" --check
[ "${SRMIG_SERVICES:-1}" = 1 ] || exit 0

# --- etcd: Debian's etcd-server (installed by ./run setup), one member, mutual TLS --------------------------
# Its certificate and key where the etcd user (Debian's unit runs etcd as etcd) reads them. Every client
# needs a certificate from our CA (--client-cert-auth), then an etcd user and its password (below).
ETC=/etc/etcd/srmig
install -d -m 0700 -o etcd -g etcd "$ETC"
install -m 0600 -o etcd -g etcd "$PKI/server.pem" "$PKI/server-key.pem" "$PKI/ca.pem" "$ETC/"
cat > /etc/default/etcd <<EOF
# written by vagrant/provision/client.sh: the srmig VM state database, reachable from the hypervisors
ETCD_LISTEN_CLIENT_URLS="https://127.0.0.1:2379,https://[$addr]:2379"
ETCD_ADVERTISE_CLIENT_URLS="https://[$addr]:2379"
ETCD_CERT_FILE="$ETC/server.pem"
ETCD_KEY_FILE="$ETC/server-key.pem"
ETCD_TRUSTED_CA_FILE="$ETC/ca.pem"
ETCD_CLIENT_CERT_AUTH="true"
EOF
systemctl enable etcd.service >/dev/null 2>&1
systemctl restart etcd.service
endpoint="https://[$addr]:2379"
i=0
# `endpoint health` takes "permission denied" (authentication on, no user given) for healthy
until ETCDCTL_API=3 etcdctl --endpoints "$endpoint" --cacert "$PKI/root/ca.pem" --cert "$PKI/root/cert.pem" \
        --key "$PKI/root/key.pem" endpoint health >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || die "etcd not healthy on $endpoint after 60 s"
    sleep 1
done
log "etcd healthy on $endpoint (TLS, client certificates)"
# Users and roles (the list `srmig db-roles` prints): root, each hypervisor's, ours; then authentication on.
etcd_auth "$SRMIG_VENV/bin/python" "$PKI" "$endpoint" "${SRMIG_HOSTS:-}" "$SRMIG_NAME"

# --- the ingress agent's unit --------------------------------------------------------------------------
# The unit `srmig install-hook --unit` writes on the hypervisors, from the same template (no libvirt hook
# here: the ingress takes no part in libvirt's migration).
"$SRMIG_VENV/bin/python" - "$CONFIG" "$UNIT" <<'EOF'
import shutil, sys
from pathlib import Path
from srmig.ctl.cli_agent import UNIT
exe = shutil.which("srmig") or f"{sys.executable} -m srmig"
Path(sys.argv[2]).write_text(UNIT.format(exe=exe, config=sys.argv[1]))
EOF
start_agent "$SRMIG" "$CONFIG" 60
log "client ready: run the demo with sudo $HERE/demo.sh"
