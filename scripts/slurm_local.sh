#!/usr/bin/env bash
# A real one-node SLURM cluster on this Debian machine, for trying the SLURM
# launcher and for its tests:
#
#   scripts/slurm_local.sh up     install (if missing) and start munge, MariaDB, slurmdbd,
#                                 slurmctld and slurmd; returns once `srun true` works
#   scripts/slurm_local.sh down   cancel every job, wait for the queue to empty, stop
#                                 each daemon by its pid file, check nothing is left
#
# Needs root and apt (Debian 12). There is no systemd in a container, so the daemons
# are started directly; `up` twice is fine (running daemons are left alone).
set -euo pipefail

CLUSTER=nanomarkov
CONF=/etc/slurm
LOGS=/var/log/slurm
RUN=/run/slurm
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# Each daemon's pid file; `down` stops them in this order (jobs' daemons first, the database last).
PIDFILES=("slurmd:$RUN/slurmd.pid" "slurmctld:$RUN/slurmctld.pid" "slurmdbd:$RUN/slurmdbd.pid"
          "mariadbd:/run/mysqld/mysqld.pid" "munged:/run/munge/munged.pid")

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the pid file names a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

# wait_for SECONDS WHAT LOG COMMAND...: retry COMMAND until it succeeds; on timeout show LOG's tail.
wait_for() {
    local seconds=$1 what=$2 log=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "slurm_local.sh: $what did not come up within ${seconds}s; last lines of $log:" >&2
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    command -v apt-get >/dev/null || die "needs apt-get to install ${missing[*]}"
    echo "installing ${missing[*]}"
    # Without systemd the packages' own start scripts fail; policy-rc.d 101 tells them not to try.
    local policy=/usr/sbin/policy-rc.d added=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    fi
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    [[ -n $added ]] && rm -f "$policy"
    return 0
}

write_config() {
    mkdir -p "$CONF" "$LOGS" "$RUN" /var/spool/slurmctld /var/spool/slurmd
    # The node as slurmd sees it (CPUs, sockets, cores, RealMemory): with a bare CPUs=N
    # the node has no memory and every --mem request is rejected.
    local node
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    local cpus memory
    cpus=$(grep -o 'CPUs=[0-9]*' <<<"$node" | cut -d= -f2)
    memory=$(grep -o 'RealMemory=[0-9]*' <<<"$node" | cut -d= -f2)
    cat >"$CONF/slurm.conf.new" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in a container: track and bind processes without them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# Jobs share the node by cores and memory, so --cpus-per-task and --mem mean what they say.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that names no --mem gets its share of the node, not all of it (which would run jobs one at a time).
DefMemPerCPU=$((memory / cpus))
SchedulerType=sched/backfill
# Start a submitted job at once, and kill a cancelled one 5 s after SIGTERM (not 30).
SchedulerParameters=batch_sched_delay=0
KillWait=5
ReturnToService=2
# sacct (and so submitit, telling a cancelled job from a running one) needs accounting.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF/slurm.conf.new" "$CONF/slurm.conf"
    cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=nanomarkov
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF/slurmdbd.conf"  # slurmdbd refuses a config others can read (it holds a password)
}

start_munge() {
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    alive /run/munge/munged.pid || runuser -u munge -- munged
    wait_for 10 munged /var/log/munge/munged.log bash -c 'munge -n | unmunge'
}

start_mariadb() {
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    if ! alive /run/mysqld/mysqld.pid; then
        mariadbd --user=mysql --datadir=/var/lib/mysql --pid-file=/run/mysqld/mysqld.pid \
            --socket=/run/mysqld/mysqld.sock --log-error=$LOGS/mariadb.log &>/dev/null &
    fi
    wait_for 30 mariadbd $LOGS/mariadb.log mariadb -e "select 1"
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'nanomarkov';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
    alive $RUN/slurmdbd.pid || slurmdbd
    wait_for 30 slurmdbd $LOGS/slurmdbd.log sacctmgr -n list cluster
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P list account "$CLUSTER" format=account) ]]; then
        sacctmgr -i add account "$CLUSTER" cluster="$CLUSTER" description=local organization=local >/dev/null
        sacctmgr -i add user root account="$CLUSTER" cluster="$CLUSTER" >/dev/null
    fi
    if alive $RUN/slurmctld.pid; then
        scontrol reconfigure  # a running cluster takes the config just written
    else
        slurmctld
    fi
    wait_for 30 slurmctld $LOGS/slurmctld.log scontrol ping
    alive $RUN/slurmd.pid || slurmd
    # A node left down or drained by an earlier run would never take the test's jobs.
    scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
    wait_for 60 "the node (srun true)" $LOGS/slurmd.log timeout 10 srun --time=1 true
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts daemons)"
    local started=$SECONDS
    install_packages
    local installed=$SECONDS
    write_config
    start_munge
    start_mariadb
    start_slurm
    echo "slurm is up: $(sinfo -h -o '%N %c CPUs %m MB %T') (install $((installed - started))s, start $((SECONDS - installed))s)"
}

down() {
    command -v scancel >/dev/null || { echo "slurm is not installed; nothing to stop"; return; }
    if alive $RUN/slurmctld.pid; then
        # slurmd going away does not stop running job steps: cancel first, and wait.
        scancel --user=root --full 2>/dev/null || true
        scancel --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while [[ -n $(squeue -h -o %i 2>/dev/null) ]]; do
            ((SECONDS < deadline)) || die "jobs still queued after 30s: $(squeue -h)"
            sleep 0.2
        done
    fi
    for entry in "${PIDFILES[@]}"; do
        local name=${entry%%:*} pidfile=${entry#*:}
        alive "$pidfile" || continue
        local pid
        pid=$(cat "$pidfile")
        kill "$pid"
        local deadline=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null; do
            ((SECONDS < deadline)) || die "$name (pid $pid) did not stop within 20s"
            sleep 0.1
        done
    done
    local left=""
    for name in slurmd slurmctld slurmdbd slurmstepd mariadbd munged; do
        left+=$(pgrep -a -x "$name" || true)
    done
    [[ -z $left ]] || die "still running after down: $left"
    echo "slurm is down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: scripts/slurm_local.sh up|down" >&2; exit 2 ;;
esac
