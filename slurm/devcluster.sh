#!/usr/bin/env bash
# Dev SLURM cluster on one machine (slurmctld + munge + slurmdbd + mariadb + one slurmd per node) for the
# tests and for trying `smat-train launcher=slurm` (also multi-node) on one machine. Runs as root and installs
# nothing (see slurm/install.sh).
#
# Nodes: $SMAT_SLURM_NODES (default 2) slurmd daemons, node i is NodeName smat-node<i> on its own loopback
# address 127.0.0.<10+i> and its own port 6830+i (one slurmd per NodeName, `slurmd -N`), each with its own
# spool, log and pid file. `smat-node<i>` is added to /etc/hosts (marked, removed by stop) so job steps and
# torch.distributed resolve the node names like on a real cluster. Each node offers every CPU of the machine,
# so a job may take one node (tasks_per_node=2) or span both (nodes=2); they share the machine's cores.
#
#   slurm/devcluster.sh start  [STATE_DIR]   # prints the `export SLURM_CONF=...` line to use
#   slurm/devcluster.sh stop   [STATE_DIR]
#   slurm/devcluster.sh status [STATE_DIR]
#
# STATE_DIR holds the generated configs, spool, state, logs, pid files and the accounting database, so
# stop + rm -rf STATE_DIR leaves nothing behind. Without STATE_DIR: $SMAT_SLURM_DIR, else the state folder of
# the cluster running on this machine (its slurmctld's SLURM_CONF; the ports are fixed, so there is at most one),
# else .cache/slurm of this repository - never a folder relative to the current directory, so every command
# works from any folder. `start` prints the folder.
set -euo pipefail

CMD=${1:-status}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

running_state() {  # the state folder of the running slurmctld, from the SLURM_CONF it was started with
  local pid conf
  pid=$(pgrep -x slurmctld | head -n1) || return 1
  conf=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | sed -n 's/^SLURM_CONF=//p' | head -n1)
  [ -n "$conf" ] || return 1
  dirname "$(dirname "$conf")"
}

if [ -n "${2:-}" ]; then B=$2
elif [ -n "${SMAT_SLURM_DIR:-}" ]; then B=$SMAT_SLURM_DIR
else B=$(running_state || echo "$REPO/.cache/slurm")
fi
[ "$CMD" = start ] && mkdir -p "$B"
B=$(realpath -m "$B")
export SLURM_CONF=$B/etc/slurm.conf
CLUSTER=smatdev
DB_PORT=${SMAT_SLURM_DB_PORT:-6820}   # not 3306, so a system mariadb does not clash
NODES=${SMAT_SLURM_NODES:-2}
[[ "$NODES" =~ ^[1-9]$ ]] || { echo "devcluster: SMAT_SLURM_NODES must be 1..9, got '$NODES'" >&2; exit 1; }
HOSTS_MARK="# smat devcluster"
node_name() { echo "smat-node$1"; }
node_addr() { echo "127.0.0.$((10 + $1))"; }
node_port() { echo "$((6830 + $1))"; }   # 6817 slurmctld, 6819 slurmdbd, 6820 mariadb

die() { echo "devcluster: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }   # the daemon may remove its pid file meanwhile
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${t}s waiting for $what (logs: $B/log)"
}

node_list() {
  local i out=""
  for i in $(seq 1 "$NODES"); do out+="${out:+,}$(node_name "$i")"; done
  echo "$out"
}

node_lines() {  # node_lines CPUS MEM_MB_PER_NODE
  local i
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") NodeHostname=$(node_name "$i") Port=$(node_port "$i") CPUs=$1 Boards=1 SocketsPerBoard=1 CoresPerSocket=$1 ThreadsPerCore=1 RealMemory=$2 State=UNKNOWN"
  done
}

hosts_add() {  # the node names resolve to their loopback addresses (what DNS does on a real cluster)
  local i line
  for i in $(seq 1 "$NODES"); do
    line="$(node_addr "$i") $(node_name "$i") $HOSTS_MARK"
    grep -qxF "$line" /etc/hosts || echo "$line" >> /etc/hosts
  done
}

hosts_remove() {
  grep -qF "$HOSTS_MARK" /etc/hosts || return 0
  # rewrite in place (not mv): /etc/hosts may be a bind mount
  local kept
  kept=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
  printf '%s\n' "$kept" > /etc/hosts
}

write_configs() {
  mkdir -p "$B"/{etc,state,spool,log,run,mysql}
  local cpus mem
  cpus=$(nproc)
  # leave a fifth of the memory to the OS, shared by the nodes; DefMemPerCPU keeps jobs from reserving all of
  # it so two jobs (e.g. a sweep) can run side by side
  mem=$(awk -v n="$NODES" '/MemTotal/ {print int($2 / 1024 * 0.8 / n)}' /proc/meminfo)
  for i in $(seq 1 "$NODES"); do mkdir -p "$B/spool/$(node_name "$i")"; done
  cat > "$B/etc/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# default 120 s: how long a requeued job must wait before it may start again
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# accounting is needed: submitit reads job states with sacct
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/filetxt
JobCompLoc=$B/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$B/state
# %n: the node name, so each slurmd of this machine has its own spool, pid file and log
SlurmdSpoolDir=$B/spool/%n
SlurmctldPidFile=$B/run/slurmctld.pid
SlurmdPidFile=$B/run/slurmd-%n.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=$(node_port 1)
SlurmctldDebug=info
SlurmdDebug=info
JobRequeue=1
KillWait=10
MinJobAge=300
MailProg=/bin/true
$(node_lines "$cpus" "$mem")
PartitionName=debug Nodes=$(node_list) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  cat > "$B/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$B/log/slurmdbd.log
PidFile=$B/run/slurmdbd.pid
StorageType=accounting_storage/mysql
# 127.0.0.1, not localhost: 'localhost' makes the client use the default unix socket
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
CONF
  chmod 600 "$B/etc/slurmdbd.conf"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (the daemons run as root in this dev setup)"
  for b in munged slurmctld slurmd slurmdbd mariadbd mariadb-install-db sacctmgr sinfo; do
    command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || die "$b not found: run slurm/install.sh first"
  done
  export PATH=$PATH:/usr/sbin
  # slurmctld reads the node list only when it starts: a cluster of this state folder running with another
  # configuration (node count, older single-node layout) is restarted (the database keeps running)
  local old=""
  [ -f "$B/etc/slurm.conf" ] && old=$(cat "$B/etc/slurm.conf")
  write_configs
  if [ "$old" != "$(cat "$B/etc/slurm.conf")" ] && { alive "$B/run/slurmctld.pid" || ls "$B"/run/slurmd*.pid >/dev/null 2>&1; }; then
    echo "devcluster: configuration changed, restarting slurmctld and slurmd"
    stop_slurm
  fi
  # munge: one daemon per machine (its socket is /run/munge), reused if already running
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if ! alive /run/munge/munged.pid; then
    runuser -u munge -- munged
  fi
  wait_for 10 munge munge -n
  if ! alive "$B/run/mysql.pid"; then
    [ -d "$B/mysql/mysql" ] || mariadb-install-db --user=root --datadir="$B/mysql" \
        --auth-root-authentication-method=socket > "$B/log/mariadb-install.log" 2>&1
    mariadbd --user=root --datadir="$B/mysql" --socket="$B/run/mysql.sock" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --pid-file="$B/run/mysql.pid" --log-error="$B/log/mariadb.err" \
        > /dev/null 2>&1 &
  fi
  wait_for 60 mariadb mariadb -S "$B/run/mysql.sock" -e "select 1"
  mariadb -S "$B/run/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; \
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw'; \
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; \
      FLUSH PRIVILEGES;"
  alive "$B/run/slurmdbd.pid" || slurmdbd   # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 30 slurmdbd sacctmgr -n show cluster
  sacctmgr -n show cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" > /dev/null
  hosts_add
  alive "$B/run/slurmctld.pid" || slurmctld
  local i
  for i in $(seq 1 "$NODES"); do
    alive "$B/run/slurmd-$(node_name "$i").pid" || slurmd -N "$(node_name "$i")"
  done
  # every node up: idle, or mixed/allocated when jobs of an earlier session still run
  wait_for 30 "$NODES node(s) up" bash -c "[ \"\$(sinfo -h -N -o '%N %T' | grep -cE ' (idle|mixed|allocated)\$')\" -ge $NODES ]"
  echo "devcluster: up, $NODES node(s) $(node_list) (state in $B)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid PIDFILE: TERM, then KILL after 10 s
  local p=$1
  if alive "$p"; then
    kill "$(cat "$p" 2>/dev/null)" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$p" || break; sleep 0.1; done
    alive "$p" && kill -9 "$(cat "$p" 2>/dev/null)" 2>/dev/null || true
  fi
  rm -f "$p"
}

stop_slurm() {  # every slurmd of this state folder (whatever node count started them), then slurmctld
  local p
  for p in "$B"/run/slurmd*.pid; do [ -e "$p" ] && stop_pid "$p"; done
  stop_pid "$B/run/slurmctld.pid"
}

stop() {
  # slurm daemons first (they talk to slurmdbd), the database last; munge is shared and left running
  stop_slurm
  stop_pid "$B/run/slurmdbd.pid"
  stop_pid "$B/run/mysql.pid"
  # the node names stay while a cluster of another state folder still runs on them
  if pgrep -x slurmctld >/dev/null; then
    echo "devcluster: a cluster of another state folder ($(running_state || echo unknown)) still runs: /etc/hosts kept"
  else
    hosts_remove
  fi
  echo "devcluster: stopped (state kept in $B)"
}

status() {
  local up=0 f i
  for f in slurmctld slurmdbd mysql; do
    if alive "$B/run/$f.pid"; then echo "$f: running (pid $(cat "$B/run/$f.pid"))"; else echo "$f: stopped"; up=1; fi
  done
  for i in $(seq 1 "$NODES"); do
    f="slurmd-$(node_name "$i")"
    if alive "$B/run/$f.pid"; then echo "$f: running (pid $(cat "$B/run/$f.pid"))"; else echo "$f: stopped"; up=1; fi
  done
  # a cluster started with another node count (or an older single-node layout) is not this one
  if [ $up -eq 0 ] && ! grep -q "^PartitionName=debug Nodes=$(node_list) " "$B/etc/slurm.conf" 2>/dev/null; then
    echo "slurm.conf: written for other nodes than $(node_list)"; up=1
  fi
  if [ $up -eq 0 ]; then sinfo -N; echo "export SLURM_CONF=$SLURM_CONF"; fi
  return $up
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status [STATE_DIR]" ;;
esac
