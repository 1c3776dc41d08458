#!/usr/bin/env bash
# Simulated two-node network for benchmarks/moe_two_node.py: two network namespaces joined by a veth pair.
#
#   benchmarks/two_node_netns.sh up [RATE]   # create; RATE e.g. 1gbit limits each direction (tc tbf), omit = unlimited
#   benchmarks/two_node_netns.sh rate RATE   # change the limit (RATE "none" removes it)
#   benchmarks/two_node_netns.sh down        # remove everything this script created
#
# Namespace A: mhmoe_nsA, veth mhmoe_vA, 10.77.0.1/24; namespace B: mhmoe_nsB, veth mhmoe_vB, 10.77.0.2/24.
# Each namespace has its own loopback (up), so ranks of one "node" talk over lo and only inter-node traffic
# crosses the veth. Needs root (ip netns, ip link, tc). netem is not used (not available here); tbf only.
set -euo pipefail
NS_A=mhmoe_nsA NS_B=mhmoe_nsB VETH_A=mhmoe_vA VETH_B=mhmoe_vB ADDR_A=10.77.0.1 ADDR_B=10.77.0.2

set_rate() {
  local rate=$1
  for pair in "$NS_A $VETH_A" "$NS_B $VETH_B"; do
    set -- $pair
    ip netns exec "$1" tc qdisc del dev "$2" root 2>/dev/null || true
    if [ "$rate" != none ]; then
      ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst 64kb latency 50ms
    fi
  done
}

down() {
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  ip link del "$VETH_A" 2>/dev/null || true
}

case "${1:-}" in
  up)
    if [ "$(id -u)" != 0 ]; then echo "two_node_netns.sh: needs root (ip netns, tc)" >&2; exit 3; fi
    down
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "$VETH_A" type veth peer name "$VETH_B"
    ip link set "$VETH_A" netns "$NS_A"
    ip link set "$VETH_B" netns "$NS_B"
    ip netns exec "$NS_A" ip addr add "$ADDR_A/24" dev "$VETH_A"
    ip netns exec "$NS_B" ip addr add "$ADDR_B/24" dev "$VETH_B"
    for ns in "$NS_A" "$NS_B"; do
      ip netns exec "$ns" ip link set lo up
      # Keep TCP's window between the bursts of all-to-all traffic (as cluster hosts are usually tuned):
      # otherwise every exchange restarts slow start, which favours many parallel flows over few.
      ip netns exec "$ns" sysctl -qw net.ipv4.tcp_slow_start_after_idle=0 || true
    done
    ip netns exec "$NS_A" ip link set "$VETH_A" up
    ip netns exec "$NS_B" ip link set "$VETH_B" up
    set_rate "${2:-none}"
    ;;
  rate) set_rate "${2:?rate, e.g. 1gbit, or none}" ;;
  down) down ;;
  *) echo "usage: $0 up [RATE] | rate RATE|none | down" >&2; exit 2 ;;
esac
