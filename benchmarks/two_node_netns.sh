#!/usr/bin/env bash
# Simulated two-node cluster for benchmarks/moe_two_node.py (2 nodes x 2 ranks), in network namespaces.
#
#   benchmarks/two_node_netns.sh up RATE [RAILS]   # RATE e.g. 1gbit limits each NIC per direction (tc tbf), none = unlimited
#   benchmarks/two_node_netns.sh down              # remove everything this script created
#   benchmarks/two_node_netns.sh env RAILS RANK    # print "NAMESPACE NIC ADDRESS" of a rank
#
# RAILS=1 (one NIC per node, some clusters are built that way): namespace per node (mhr_node0, mhr_node1)
#   joined by one veth pair (mhr_nic0 <-> mhr_nic1, 10.79.0.1 / 10.79.0.2); ranks of a node share its
#   namespace and talk over its loopback, so only inter-node traffic crosses the veth.
# RAILS=2 (one NIC per rank, a rail-optimised fabric): namespace per rank (mhr_rank0..3) and a switch
#   namespace (mhr_switch) with a bridge; rank r's NIC mhr_nic<r> (10.78.0.<r+1>/24) is a veth into the
#   bridge, with a tbf at both ends (rank side: egress, switch side: the rank's ingress). The two ranks of a
#   node are joined by an unlimited veth (mhr_node<r>, "NVLink") and a host route to the node-mate's NIC
#   address over it, so intra-node traffic never touches a NIC. gloo does not bind a connection's source
#   address, so GLOO_SOCKET_IFNAME = the rank's NIC and this one-namespace-per-rank layout are what make
#   every rank's inter-node traffic leave through its own NIC. rp_filter is off (replies to a node-mate
#   come back over the node link), TCP slow start after idle too.
# Every address lives inside namespaces this script creates; `up` removes everything again if it fails.
# MHMOE_NETNS_PREFIX (default mhr) names the namespaces and links, so that two runs on one machine do not
# remove each other's.
set -Eeuo pipefail  # -E: the ERR trap of `up` also fires inside its functions
P=${MHMOE_NETNS_PREFIX:-mhr}
NAMESPACES="${P}_node0 ${P}_node1 ${P}_rank0 ${P}_rank1 ${P}_rank2 ${P}_rank3 ${P}_switch"

down() {
  for ns in $NAMESPACES; do ip netns del "$ns" 2>/dev/null || true; done
}

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

tune() {  # the settings every namespace gets
  nsx "$1" ip link set lo up
  nsx "$1" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
    net.ipv4.tcp_slow_start_after_idle=0
}

tbf() {  # tbf NAMESPACE DEV RATE
  if [ "$3" != none ]; then nsx "$1" tc qdisc add dev "$2" root tbf rate "$3" burst 64kb latency 50ms; fi
}

up1() {
  local rate=$1
  ip netns add ${P}_node0
  ip netns add ${P}_node1
  tune ${P}_node0
  tune ${P}_node1
  ip link add ${P}_nic0 netns ${P}_node0 type veth peer name ${P}_nic1 netns ${P}_node1
  for n in 0 1; do
    nsx ${P}_node$n ip addr add 10.79.0.$((n + 1))/24 dev ${P}_nic$n
    nsx ${P}_node$n ip link set ${P}_nic$n up
    tbf ${P}_node$n ${P}_nic$n "$rate"
  done
}

up2() {
  local rate=$1
  ip netns add ${P}_switch
  tune ${P}_switch
  nsx ${P}_switch ip link add ${P}_br type bridge
  nsx ${P}_switch ip link set ${P}_br up
  for r in 0 1 2 3; do
    ip netns add ${P}_rank$r
    tune ${P}_rank$r
    ip link add ${P}_nic$r netns ${P}_rank$r type veth peer name ${P}_port$r netns ${P}_switch
    nsx ${P}_rank$r ip addr add 10.78.0.$((r + 1))/24 dev ${P}_nic$r
    nsx ${P}_rank$r ip link set ${P}_nic$r up
    nsx ${P}_switch ip link set ${P}_port$r master ${P}_br
    nsx ${P}_switch ip link set ${P}_port$r up
    tbf ${P}_rank$r ${P}_nic$r "$rate"
    tbf ${P}_switch ${P}_port$r "$rate"
  done
  for a in 0 2; do  # node-mates a and a+1: the unlimited node link and host routes over it
    local b=$((a + 1))
    ip link add ${P}_node$a netns ${P}_rank$a type veth peer name ${P}_node$b netns ${P}_rank$b
    nsx ${P}_rank$a ip link set ${P}_node$a up
    nsx ${P}_rank$b ip link set ${P}_node$b up
    nsx ${P}_rank$a ip route add 10.78.0.$((b + 1))/32 dev ${P}_node$a src 10.78.0.$((a + 1))
    nsx ${P}_rank$b ip route add 10.78.0.$((a + 1))/32 dev ${P}_node$b src 10.78.0.$((b + 1))
  done
}

case "${1:-}" in
  up)
    if [ "$(id -u)" != 0 ]; then echo "two_node_netns.sh: needs root (ip netns, tc)" >&2; exit 3; fi
    rate=${2:-none} rails=${3:-1}
    down
    trap 'down' ERR
    case "$rails" in
      1) up1 "$rate" ;;
      2) up2 "$rate" ;;
      *) echo "two_node_netns.sh: RAILS=$rails; this 2 x 2 simulator has 1 (per node) or 2 (per rank) NICs per node" >&2
         exit 2 ;;
    esac
    trap - ERR
    ;;
  env)
    rails=${2:?RAILS} rank=${3:?RANK}
    if [ "$rails" = 1 ]; then n=$((rank / 2)); echo "${P}_node$n ${P}_nic$n 10.79.0.$((n + 1))"
    else echo "${P}_rank$rank ${P}_nic$rank 10.78.0.$((rank + 1))"; fi
    ;;
  down) down ;;
  *) echo "usage: $0 up RATE|none [RAILS] | env RAILS RANK | down" >&2; exit 2 ;;
esac
