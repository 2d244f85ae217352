#!/usr/bin/env bash
# A SLURM cluster of several nodes on this machine, for the launcher's tests (no systemd, no accounting).
#
#   tests/slurm/cluster.sh install             Debian's slurmctld, slurmd, slurm-client, munge, iproute2 (as root)
#   tests/slurm/cluster.sh start [--nodes N]   N nodes (default 2): write the config, start munged, slurmctld
#                                              and one slurmd per node; wait until every node is idle
#   tests/slurm/cluster.sh stop                stop the daemons, remove the nodes' namespaces and the bridge
#   tests/slurm/cluster.sh env                 print the SLURM_CONF line the clients need, and the node count
#
# Each node is a slurmd in its own network, UTS and mount namespace: its own hostname (node1, node2, ...),
# its own address on a bridge this script creates ($SLURM_TEST_NET.11, .12, ...; the controller is
# $SLURM_TEST_NET.1), and a hosts file naming every node. Files are shared, as on a cluster's shared
# filesystem; munge's socket is a file, so one munged serves every node.
# State, logs and slurm.conf live in $SLURM_TEST_DIR (default /tmp/densenet-slurm).
set -euo pipefail

DIR="${SLURM_TEST_DIR:-/tmp/densenet-slurm}"
CONF="$DIR/slurm.conf"
NET="${SLURM_TEST_NET:-10.213.0}"  # the first three octets of the bridge's /24
BRIDGE=slurmtest0
CONTROLLER="$NET.1"

install() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null \
        && command -v ip >/dev/null; then
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
}

node_count() {
    cat "$DIR/nodes" 2>/dev/null || echo 2
}

node_addr() {
    echo "$NET.$((10 + $1))"
}

write_conf() {
    local nodes="$1" host hardware i
    host="$(hostname -s)"
    # the machine's hardware line, minus the node name and the uptime slurmd -C prints; every node claims it
    hardware="$(slurmd -C | head -n 1 | sed -e "s/^NodeName=[^ ]* //")"
    mkdir -p "$DIR/ctld"
    cat >"$CONF" <<EOF
ClusterName=densenet-test
SlurmctldHost=$host($CONTROLLER)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (120 by default)
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=3600
EOF
    {
        echo "127.0.0.1 localhost"
        echo "$CONTROLLER $host"
    } >"$DIR/hosts"
    for i in $(seq "$nodes"); do
        echo "NodeName=node$i NodeAddr=$(node_addr "$i") NodeHostname=node$i $hardware State=UNKNOWN" >>"$CONF"
        echo "$(node_addr "$i") node$i" >>"$DIR/hosts"
        mkdir -p "$DIR/spool/node$i"
    done
    echo "PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

make_network() {
    local nodes="$1" i
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$CONTROLLER/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    for i in $(seq "$nodes"); do
        if ! ip netns list | grep -qw "slurm-node$i"; then
            ip netns add "slurm-node$i"
        fi
        if ! ip link show "slurmtest-n$i" >/dev/null 2>&1; then
            ip link add "slurmtest-n$i" type veth peer name eth0 netns "slurm-node$i"
            ip link set "slurmtest-n$i" master "$BRIDGE"
            ip link set "slurmtest-n$i" up
            ip -n "slurm-node$i" addr add "$(node_addr "$i")/24" dev eth0
            ip -n "slurm-node$i" link set eth0 up
            ip -n "slurm-node$i" link set lo up
        fi
    done
}

remove_network() {
    local name
    for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^slurm-node' || true); do
        ip netns del "$name"
    done
    for name in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep '^slurmtest' || true); do
        ip link del "$name" 2>/dev/null || true
    done
}

running() {
    local name="$1"
    [[ -f "$DIR/$name.pid" ]] && kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null
}

start_node() {
    local i="$1"
    # the node's own hostname and hosts file, in its own network namespace; slurmd daemonizes there
    # (nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd reads)
    nsenter --net="/run/netns/slurm-node$i" unshare --uts --mount --propagation private sh -c \
        "hostname node$i && mount --bind '$DIR/hosts' /etc/hosts && exec slurmd -N node$i -f '$CONF'"
}

all_running() {
    local nodes="$1" i
    running slurmctld || return 1
    for i in $(seq "$nodes"); do
        running "slurmd-node$i" || return 1
    done
}

start() {
    local nodes
    nodes="$(node_count)"
    if [[ "${1:-}" == "--nodes" ]]; then
        nodes="${2:?--nodes needs a number}"
    fi
    if ! [[ "$nodes" =~ ^[1-9][0-9]?$ ]]; then
        echo "--nodes $nodes: give a number of nodes from 1 to 99" >&2
        exit 2
    fi
    install
    mkdir -p "$DIR"
    if [[ "$(node_count)" == "$nodes" ]] && all_running "$nodes"; then
        env_lines
        return
    fi
    stop >/dev/null
    echo "$nodes" >"$DIR/nodes"
    write_conf "$nodes"
    make_network "$nodes"
    mkdir -p /run/munge
    chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- munged
    fi
    # -c: a fresh controller state, so no job of an earlier session comes back
    slurmctld -c -f "$CONF"
    for i in $(seq "$nodes"); do
        start_node "$i"
    done
    export SLURM_CONF="$CONF"
    for _ in $(seq 90); do
        if [[ "$(sinfo -h -N -t idle -o "%N" 2>/dev/null | sort -u | wc -l)" == "$nodes" ]]; then
            env_lines
            return
        fi
        sleep 1
    done
    echo "the test cluster did not come up; see $DIR/slurmctld.log and $DIR/slurmd-node*.log" >&2
    sinfo -N >&2 || true
    tail -n 20 "$DIR/slurmctld.log" "$DIR"/slurmd-node*.log >&2 || true
    exit 1
}

stop() {
    local pidfile
    for pidfile in "$DIR"/slurmd*.pid "$DIR/slurmctld.pid"; do
        [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for _ in $(seq 30); do
        local alive=0
        for pidfile in "$DIR"/slurmd*.pid "$DIR/slurmctld.pid"; do
            [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1
        done
        [[ "$alive" == 0 ]] && break
        sleep 1
    done
    rm -f "$DIR"/slurmd*.pid "$DIR/slurmctld.pid"
    remove_network
}

env_lines() {
    echo "SLURM_TEST_NODES=$(node_count)"
    echo "SLURM_CONF=$CONF"
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) stop ;;
    env) env_lines ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
