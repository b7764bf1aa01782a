#!/bin/sh
# A Vagrant hypervisor (hv1, hv2): its fabric and management links, then host.sh (the same script the
# namespace testbed's `srmig demo --libvirt` runs: agent config, the VM's tap with the anycast gateway), the
# libvirt qemu hook and the agent's systemd unit (`srmig install-hook --unit`), libvirtd restarted so it
# reads the hook and listens on the management network, the agent (re)started. Idempotent; the Vagrantfile
# runs it at every `vagrant up` (links, tap and sysctls do not survive a reboot).
#
# Environment (set by the Vagrantfile), besides host.sh's own (SRMIG_NAME, SRMIG_LOCATOR, SRMIG_DOMAIN,
# SRMIG_TRANSIT, SRMIG_DB, SRMIG_ETCD, SRMIG_XDP_MODE, ...), which pass through:
#   SRMIG_FABRIC_MAC, SRMIG_FABRIC_ADDR   the fabric NIC and its address/prefix: host.sh's SRMIG_FABRIC and
#                                         SRMIG_ADDRESS are derived from them
#   SRMIG_FABRIC_ADDR4  its IPv4 address/prefix: the VM's IPv4 replies leave by it (lib.sh) [none]
#   SRMIG_MGMT_MAC, SRMIG_MGMT_ADDR       the management NIC: libvirt's peer-to-peer migration (control
#                                         connection and the QEMU stream)
#   SRMIG_ROUTES      "PREFIX=GATEWAY ..." on the fabric (the other host's locator) [none]
#   SRMIG_NEIGHBOURS  "ADDR=MAC ..." permanent neighbours on the fabric [none]
#   SRMIG_CONFIG      the agent's config [/etc/srmig/agent.toml]
#   SRMIG_SERVICES    0: stop after the links and the config, touching no system service (etcd, libvirtd,
#                     systemd units): what tests/test_vagrant.py runs in a network namespace [1]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
CONFIG=${SRMIG_CONFIG:-/etc/srmig/agent.toml}
UNIT=/etc/systemd/system/srmig-agent.service
SRMIG=$SRMIG_VENV/bin/srmig
[ -x "$SRMIG" ] || die "$SRMIG not found: run common.sh (./run setup) first"

# --- links ----------------------------------------------------------------------------------------------
# Forwarding: the VM's replies are routed from its tap to the fabric, of both families (srmig's IPv4
# delivery is an IPv4 FIB lookup, which needs IPv4 forwarding too). seg6_enabled as in the testbed's hosts.
sysctl -qw net.ipv6.conf.all.forwarding=1 net.ipv6.conf.all.seg6_enabled=1 net.ipv6.conf.default.seg6_enabled=1
sysctl -qw net.ipv4.ip_forward=1
links_setup
echo 1 > "/proc/sys/net/ipv6/conf/$fabric/seg6_enabled"

# --- srmig host: config and tap (one source of truth with the namespace testbed) -------------------------
SRMIG_FABRIC=$fabric SRMIG_ADDRESS=${SRMIG_FABRIC_ADDR%/*} SRMIG_CONFIG=$CONFIG sh "$HERE/host.sh"
"$SRMIG" agent --config "$CONFIG" --check
[ "${SRMIG_SERVICES:-1}" = 1 ] || exit 0

# The state database is the client's etcd; the one Debian's etcd-server starts here would only confuse.
if [ "${SRMIG_DB:-embedded}" = etcd ]; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi

# --- libvirtd: the hook, and a TCP listener on the management network --------------------------------------
# Peer-to-peer migration: hv1's libvirtd opens qemu+tcp://[hv2's management address]/system, and the client
# drives both daemons the same way (demo.sh). No authentication: the management network is an isolated
# libvirt network between these three VMs. Never expose a listener like this on a network you share.
conf=/etc/libvirt/libvirtd.conf
if grep -q '^auth_tcp *=' "$conf"; then
    sed -i 's/^auth_tcp *=.*/auth_tcp = "none"/' "$conf"
else
    printf '# srmig Vagrant demo, see vagrant/provision/hv.sh\nauth_tcp = "none"\n' >> "$conf"
fi
mkdir -p /etc/systemd/system/libvirtd-tcp.socket.d
cat > /etc/systemd/system/libvirtd-tcp.socket.d/srmig.conf <<EOF
# written by vagrant/provision/hv.sh: listen on the management address only (FreeBind: before it exists)
[Socket]
ListenStream=
ListenStream=[${SRMIG_MGMT_ADDR%/*}]:16509
FreeBind=yes
EOF
"$SRMIG" install-hook --config "$CONFIG" --unit "$UNIT" --force
systemctl daemon-reload
# libvirtd reads its hooks when it starts; the TCP socket is socket-activated, so stop the daemon first.
systemctl stop libvirtd.service
systemctl enable libvirtd-tcp.socket >/dev/null 2>&1
systemctl restart libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket libvirtd-tcp.socket
systemctl start libvirtd.service

# --- the agent ------------------------------------------------------------------------------------------
# Bounded wait for its socket (the first start compiles the XDP program with bcc: tens of seconds under TCG).
# The database may still be unreachable if the client is not up yet: the agent retries, nothing to wait for.
start_agent "$SRMIG" "$CONFIG" 180
log "hypervisor $(hostname) ready"
