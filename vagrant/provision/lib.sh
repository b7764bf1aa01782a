# Shell functions shared by the Vagrant provisioning scripts (hv.sh, client.sh, demo.sh); sourced, not run.
# The namespace testbed builds its links itself (srmig.testbed.testbed); these do the same job on the
# Vagrant machines, whose interfaces are found by the MAC addresses the Vagrantfile gives them.

SRMIG_VENV=${SRMIG_VENV:-/opt/srmig/venv}   # outside the rsync'ed /srmig: `vagrant rsync` never touches it

log() { printf '[srmig %s] %s\n' "$(hostname)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# iface_by_mac MAC: the name of the interface with that MAC (guest NIC names vary: eth1, ens6, ...).
iface_by_mac() {
    want=$(echo "$1" | tr 'A-F' 'a-f')
    for d in /sys/class/net/*; do
        if [ "$(cat "$d/address" 2>/dev/null)" = "$want" ]; then
            basename "$d"
            return 0
        fi
    done
    log "no interface with MAC $1"
    return 1
}

# link_setup IFACE ADDR/PLEN: up, one static IPv6 address (no DAD: unique by construction, and a tentative
# address cannot be bound by etcd or libvirt), no autoconfiguration and no ICMPv6 redirects (a host
# forwarding out of the interface it received on must not make the client learn host routes).
link_setup() {
    for k in accept_dad=0 autoconf=0 accept_ra=0 accept_redirects=0; do
        echo "${k#*=}" > "/proc/sys/net/ipv6/conf/$1/${k%=*}"
    done
    ip link set "$1" up
    ip -6 addr replace "$2" dev "$1" nodad
}

# routes_setup IFACE "PREFIX=GATEWAY ...": static routes through next hops on IFACE.
routes_setup() {
    for r in $2; do
        ip -6 route replace "${r%%=*}" via "${r#*=}" dev "$1"
    done
}

# links_setup: the fabric and management NICs named by SRMIG_FABRIC_MAC / SRMIG_MGMT_MAC get
# SRMIG_FABRIC_ADDR / SRMIG_MGMT_ADDR; the fabric also SRMIG_ROUTES and SRMIG_NEIGHBOURS. Sets $fabric, $mgmt.
links_setup() {
    : "${SRMIG_FABRIC_MAC:?}" "${SRMIG_FABRIC_ADDR:?}" "${SRMIG_MGMT_MAC:?}" "${SRMIG_MGMT_ADDR:?}"
    fabric=$(iface_by_mac "$SRMIG_FABRIC_MAC")
    mgmt=$(iface_by_mac "$SRMIG_MGMT_MAC")
    link_setup "$fabric" "$SRMIG_FABRIC_ADDR"
    link_setup "$mgmt" "$SRMIG_MGMT_ADDR"
    routes_setup "$fabric" "${SRMIG_ROUTES:-}"
    neighbours_setup "$fabric" "${SRMIG_NEIGHBOURS:-}"
    log "fabric $fabric $SRMIG_FABRIC_ADDR, management $mgmt $SRMIG_MGMT_ADDR"
}

# neighbours_setup IFACE "ADDR=MAC ...": permanent neighbour entries, as the testbed's static_neigh: a first
# burst towards a peer (a freshly resumed VM's replies) never waits in the neighbour resolution queue.
neighbours_setup() {
    for n in $2; do
        ip -6 neigh replace "${n%%=*}" lladdr "${n#*=}" dev "$1" nud permanent
    done
}

# start_agent SRMIG CONFIG SECONDS: restart the srmig-agent unit, wait (bounded) until it answers, show status.
start_agent() {
    systemctl daemon-reload
    systemctl enable srmig-agent.service >/dev/null 2>&1
    systemctl restart srmig-agent.service
    i=0
    until "$1" status --config "$2" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge "$3" ]; then
            journalctl -u srmig-agent.service -n 30 --no-pager >&2 || true
            die "srmig agent not answering after $3 s"
        fi
        sleep 1
    done
    "$1" status --config "$2"
}
