#!/bin/bash
# Two "hosts" on one machine: network namespaces hope_n0 / hope_n1 joined by a veth pair whose
# both ends are shaped to RATE (default 1gbit) with a token-bucket filter.
#   bench/netns_link.sh up [RATE]    create (10.77.0.1 in hope_n0, 10.77.0.2 in hope_n1)
#   bench/netns_link.sh down         remove
# Needs root (CAP_NET_ADMIN). The interface names are hope_v0 / hope_v1 (GLOO_SOCKET_IFNAME).
set -euo pipefail
cmd=${1:?usage: $0 up [RATE] | down}
rate=${2:-1gbit}
case "$cmd" in
  up)
    for i in 0 1; do ip netns add hope_n$i; ip -n hope_n$i link set lo up; done
    ip link add hope_v0 netns hope_n0 type veth peer name hope_v1 netns hope_n1
    for i in 0 1; do
      ip -n hope_n$i addr add 10.77.0.$((i + 1))/24 dev hope_v$i
      ip -n hope_n$i link set hope_v$i up
      ip netns exec hope_n$i tc qdisc add dev hope_v$i root tbf rate "$rate" burst 512kb latency 100ms
    done
    ;;
  down)
    for i in 0 1; do ip netns del hope_n$i 2>/dev/null || true; done
    ;;
  *) echo "usage: $0 up [RATE] | down" >&2; exit 2 ;;
esac
