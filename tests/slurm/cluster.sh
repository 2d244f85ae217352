#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the launcher's tests (no systemd, no accounting).
#
#   tests/slurm/cluster.sh install   Debian's slurmctld, slurmd, slurm-client and munge (as root)
#   tests/slurm/cluster.sh start     write the config, start munged, slurmctld and slurmd; wait for the node
#   tests/slurm/cluster.sh stop      stop them by their PID files
#   tests/slurm/cluster.sh env       print the SLURM_CONF line the clients need
#
# State, logs and slurm.conf live in $SLURM_TEST_DIR (default /tmp/densenet-slurm).
set -euo pipefail

DIR="${SLURM_TEST_DIR:-/tmp/densenet-slurm}"
CONF="$DIR/slurm.conf"

install() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local host hardware
    host="$(hostname -s)"
    # the node's real hardware line, minus the uptime slurmd -C appends
    hardware="$(slurmd -C | head -n 1 | sed -e "s/^NodeName=[^ ]* //")"
    mkdir -p "$DIR/ctld" "$DIR/spool"
    cat >"$CONF" <<EOF
ClusterName=densenet-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (120 by default)
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
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
NodeName=$host NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() {
    local name="$1"
    [[ -f "$DIR/$name.pid" ]] && kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null
}

start() {
    install
    mkdir -p "$DIR"
    if running slurmctld && running slurmd; then
        echo "SLURM_CONF=$CONF"
        return
    fi
    write_conf
    mkdir -p /run/munge
    chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- munged
    fi
    # -c: a fresh controller state, so no job of an earlier session comes back
    running slurmctld || slurmctld -c -f "$CONF"
    running slurmd || slurmd -f "$CONF"
    export SLURM_CONF="$CONF"
    for _ in $(seq 60); do
        if sinfo -h -o "%T" 2>/dev/null | grep -qx "idle"; then
            echo "SLURM_CONF=$CONF"
            return
        fi
        sleep 1
    done
    echo "the test cluster did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    exit 1
}

stop() {
    for name in slurmd slurmctld; do
        if running "$name"; then
            kill "$(cat "$DIR/$name.pid")"
        fi
    done
    for _ in $(seq 30); do
        running slurmd || running slurmctld || return 0
        sleep 1
    done
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    env) echo "SLURM_CONF=$CONF" ;;
    *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
