#!/usr/bin/env bash
# Single-node dev SLURM cluster (slurmctld + slurmd + munge + slurmdbd + mariadb) for the tests and for
# trying `smat-train launcher=slurm` on one machine. Runs as root and installs nothing (see slurm/install.sh).
#
#   slurm/devcluster.sh start  [STATE_DIR]   # prints the `export SLURM_CONF=...` line to use
#   slurm/devcluster.sh stop   [STATE_DIR]
#   slurm/devcluster.sh status [STATE_DIR]
#
# STATE_DIR (default $SMAT_SLURM_DIR, else .cache/slurm) holds the generated configs, spool, state,
# logs, pid files and the accounting database, so stop + rm -rf STATE_DIR leaves nothing behind.
set -euo pipefail

CMD=${1:-status}
B=${2:-${SMAT_SLURM_DIR:-.cache/slurm}}
mkdir -p "$B"
B=$(cd "$B" && pwd)
export SLURM_CONF=$B/etc/slurm.conf
CLUSTER=smatdev
DB_PORT=${SMAT_SLURM_DB_PORT:-6820}   # not 3306, so a system mariadb does not clash

die() { echo "devcluster: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${t}s waiting for $what (logs: $B/log)"
}

write_configs() {
  mkdir -p "$B"/{etc,state,spool,log,run,mysql}
  local cpus mem
  cpus=$(nproc)
  # leave a fifth of the memory to the OS; DefMemPerCPU keeps jobs from reserving all of it so two
  # jobs (e.g. a sweep) can run side by side
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
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
SlurmdSpoolDir=$B/spool
SlurmctldPidFile=$B/run/slurmctld.pid
SlurmdPidFile=$B/run/slurmd.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldDebug=info
SlurmdDebug=info
JobRequeue=1
KillWait=10
MinJobAge=300
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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
  write_configs
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
  alive "$B/run/slurmctld.pid" || slurmctld
  alive "$B/run/slurmd.pid" || slurmd -N localhost
  wait_for 30 "node idle" bash -c '[ "$(sinfo -h -o %T | head -1)" = idle ] || [ "$(sinfo -h -o %T | head -1)" = mixed ]'
  echo "devcluster: up (state in $B)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  # slurm daemons first (they talk to slurmdbd), the database last; munge is shared and left running
  for f in slurmd slurmctld slurmdbd mysql; do
    local p="$B/run/$f.pid"
    if alive "$p"; then
      kill "$(cat "$p" 2>/dev/null)" 2>/dev/null || true
      for _ in $(seq 1 100); do alive "$p" || break; sleep 0.1; done
      alive "$p" && kill -9 "$(cat "$p" 2>/dev/null)" 2>/dev/null || true
    fi
    rm -f "$p"
  done
  echo "devcluster: stopped (state kept in $B)"
}

status() {
  local up=0
  for f in slurmctld slurmd slurmdbd mysql; do
    if alive "$B/run/$f.pid"; then echo "$f: running (pid $(cat "$B/run/$f.pid"))"; else echo "$f: stopped"; up=1; fi
  done
  if [ $up -eq 0 ]; then sinfo; echo "export SLURM_CONF=$SLURM_CONF"; fi
  return $up
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status [STATE_DIR]" ;;
esac
