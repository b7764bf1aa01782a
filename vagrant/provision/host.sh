#!/bin/sh
# Provision one srmig hypervisor host: its agent config and the VM-facing tap with the anycast gateway.
# The same script provisions the Vagrant hosts (vagrant/Vagrantfile) and the namespace testbed's hosts
# (srmig demo --libvirt runs it inside each host's network namespace), so CI exercises it.
#
# Environment (defaults in brackets):
#   SRMIG_NAME        host name, unique [hostname]
#   SRMIG_FABRIC      fabric interface (XDP attaches here) [required]
#   SRMIG_LOCATOR     this host's locator, e.g. fc00:0:1::/48 [required]
#   SRMIG_ADDRESS     this host's fabric address (source of what the agent sends) [required]
#   SRMIG_TRANSIT     space-separated SIDs between hosts on the migration path [none]
#   SRMIG_DOMAIN      space-separated SR-domain source prefixes (RFC 8754 5.1): only they reach this host's
#                     SIDs [required; "::/0" accepts every source]
#   SRMIG_XDP_MODE    native | generic [native]
#   SRMIG_DB          embedded | etcd [embedded]
#   SRMIG_DB_PATH     embedded database file [/var/lib/srmig/state.db]
#   SRMIG_ETCD        etcd endpoints, space-separated URLs [https://127.0.0.1:2379]
#   SRMIG_ETCD_CA     the CA of etcd's certificate (PEM) [required with https:// endpoints]
#   SRMIG_ETCD_CERT, SRMIG_ETCD_KEY   this agent's client certificate and key [required with https://]
#   SRMIG_ETCD_INSECURE  true: allow http:// endpoints, no TLS (`srmig agent --check` warns) [false]
#   SRMIG_ETCD_USER, SRMIG_ETCD_PASSWORD_FILE   this agent's etcd user and the root-only file with its
#                     password (etcd's authentication: `srmig db-roles`) [none]
#   SRMIG_SOCKET      the agent's unix socket [/run/srmig/agent.sock]
#   SRMIG_LIBVIRT_URI [qemu:///system]
#   SRMIG_QEMU_RUN_DIR where libvirt writes <domain>.pid [/run/libvirt/qemu]
#   SRMIG_GRACE_S     [2.0]
#   SRMIG_METRICS     Prometheus listen address, "" for none [127.0.0.1:9477]
#   SRMIG_CONFIG      where to write the config [/etc/srmig/agent.toml]
#   SRMIG_TAP         the VM's tap (libvirt <target dev=... managed='no'/>) [vmtap]
#   SRMIG_VM_ADDR     the VM's IPv6 address [2001:db8:100::10]
#   SRMIG_VM_ADDR4    the VM's IPv4 address, for a dual-stack VM [none: IPv6 only]
#   SRMIG_GW4         the VM's IPv4 anycast gateway, the same on every host [198.51.100.1]
#   SRMIG_VM_MAC      the VM's MAC [02:00:00:00:10:10]
#   SRMIG_GW_MAC      the anycast gateway MAC, the same on every host [02:00:5e:00:00:01]
set -eu
: "${SRMIG_FABRIC:?set SRMIG_FABRIC}" "${SRMIG_LOCATOR:?set SRMIG_LOCATOR}" "${SRMIG_ADDRESS:?set SRMIG_ADDRESS}"
: "${SRMIG_DOMAIN:?set SRMIG_DOMAIN: the SR domain prefixes whose sources reach our SIDs ("::/0" for every source)}"
NAME=${SRMIG_NAME:-$(hostname)}
CONFIG=${SRMIG_CONFIG:-/etc/srmig/agent.toml}
TAP=${SRMIG_TAP:-vmtap}
VM_ADDR=${SRMIG_VM_ADDR:-2001:db8:100::10}
VM_ADDR4=${SRMIG_VM_ADDR4:-}
GW4=${SRMIG_GW4:-198.51.100.1}
VM_MAC=${SRMIG_VM_MAC:-02:00:00:00:10:10}
GW_MAC=${SRMIG_GW_MAC:-02:00:5e:00:00:01}

toml_list() {  # "a b" -> ["a", "b"]
    out=""
    for x in $1; do out="$out${out:+, }\"$x\""; done
    echo "[$out]"
}
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
# written by vagrant/provision/host.sh
[host]
name = "$NAME"
fabric = "$SRMIG_FABRIC"
locator = "$SRMIG_LOCATOR"
address = "$SRMIG_ADDRESS"
transit = $(toml_list "${SRMIG_TRANSIT:-}")
sr_domain = $(toml_list "$SRMIG_DOMAIN")
xdp_mode = "${SRMIG_XDP_MODE:-native}"
libvirt_uri = "${SRMIG_LIBVIRT_URI:-qemu:///system}"
qemu_run_dir = "${SRMIG_QEMU_RUN_DIR:-/run/libvirt/qemu}"
grace_s = ${SRMIG_GRACE_S:-2.0}
drain = ${SRMIG_DRAIN:-true}
fence = "${SRMIG_FENCE:-pause}"

[db]
backend = "${SRMIG_DB:-embedded}"
path = "${SRMIG_DB_PATH:-/var/lib/srmig/state.db}"
endpoints = $(toml_list "${SRMIG_ETCD:-https://127.0.0.1:2379}")
${db_tls}insecure = ${SRMIG_ETCD_INSECURE:-false}

[hook]
socket = "${SRMIG_SOCKET:-/run/srmig/agent.sock}"

[metrics]
listen = "${SRMIG_METRICS-127.0.0.1:9477}"
TOML
mv "$CONFIG.tmp" "$CONFIG"

# The VM's tap exists before libvirt starts QEMU (managed='no'), on every host the VM may run on: the
# anycast gateway (one MAC, link-local fe80::1), a /128 route and a permanent neighbour entry for the VM.
# No multicast: srmig counts the frames QEMU reads (srmig.ctl.drain.SwallowCheck).
ip link show "$TAP" >/dev/null 2>&1 || ip tuntap add dev "$TAP" mode tap
ip link set "$TAP" address "$GW_MAC" multicast off
echo 0 > "/proc/sys/net/ipv6/conf/$TAP/accept_dad"
ip link set "$TAP" up
ip -6 addr replace fe80::1/64 dev "$TAP" nodad
ip -6 route replace "$VM_ADDR/128" dev "$TAP"
ip -6 neigh replace "$VM_ADDR" lladdr "$VM_MAC" dev "$TAP" nud permanent
# A dual-stack VM: the IPv4 anycast gateway as a /32 on the tap (no connected route: the VM's subnet is not
# this host's), so the kernel answers the VM's ARP for it with the gateway MAC on every host and a moved VM's
# ARP entry stays right; a /32 route and a permanent neighbour entry for the VM, as for IPv6. srmig delivers
# IPv4 by a FIB lookup (bpf_fib_lookup), which needs net.ipv4.ip_forward on: the host's, not set here.
if [ -n "$VM_ADDR4" ]; then
    ip -4 addr replace "$GW4/32" dev "$TAP"
    ip -4 route replace "$VM_ADDR4/32" dev "$TAP"
    ip -4 neigh replace "$VM_ADDR4" lladdr "$VM_MAC" dev "$TAP" nud permanent
fi
echo "srmig host $NAME: $CONFIG written, tap $TAP ready for $VM_ADDR${VM_ADDR4:+ and $VM_ADDR4}"
