#!/usr/bin/env bash
# Local infrastructure without Docker: a real Apache Kafka 4.x broker (KRaft, single node) fetched from
# Maven Central, and Debian's redis-server. Usage: infra.sh up | down | status
#
#   up      fetch Kafka (cached), format KRaft storage once, start Kafka on 127.0.0.1:9092 and Redis on
#           127.0.0.1:6379 unless they already answer, wait for both, create the topics. Idempotent.
#   down    stop what `up` started (by pid file); a Redis or Kafka that `up` did not start is left alone.
#   status  report both.
#
# State lives in $LOCAL_DIR (default: <repo>/.local): kafka.pid, kafka.log, kafka-data/, redis.pid, redis.log.
# Jars are cached in $KAFKA_CACHE (default: ~/.cache/llm-provider-worker/kafka-<version>), so a second run
# needs no network.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/pom.xml")
LOCAL_DIR=${LOCAL_DIR:-$ROOT/.local}
KAFKA_CACHE=${KAFKA_CACHE:-$HOME/.cache/llm-provider-worker/kafka-$KAFKA_VERSION}
KAFKA_PORT=9092
REDIS_PORT=${REDIS_PORT:-6379}

log() { echo "[infra] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The process in pid file $1, if it is still one whose command line holds $2 (after a reboot the pid may
# belong to another process: not ours to report, nor to kill).
pid_alive() {
  [ -f "$1" ] || return 1
  local pid; pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && grep -qa -- "$2" "/proc/$pid/cmdline" 2>/dev/null
}

fetch_kafka() {
  if [ -f "$KAFKA_CACHE/lib/kafka_2.13-$KAFKA_VERSION.jar" ]; then return; fi
  command -v mvn >/dev/null || { log "installing maven"; apt_install maven; }
  log "fetching Kafka $KAFKA_VERSION from Maven Central into $KAFKA_CACHE"
  mkdir -p "$KAFKA_CACHE"
  # -C: a jar whose checksum does not match the one Maven Central publishes with it fails the fetch (Maven
  # only warns by default).
  mvn -q -B -C -f "$HERE/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_CACHE/lib.tmp"
  rm -rf "$KAFKA_CACHE/lib" && mv "$KAFKA_CACHE/lib.tmp" "$KAFKA_CACHE/lib"
}

apt_install() {
  local as_root=; [ "$(id -u)" -eq 0 ] || as_root=sudo  # apt-get needs root
  if [ -z "${APT_UPDATED:-}" ]; then $as_root apt-get update -qq; APT_UPDATED=1; fi
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

kafka_java() {
  java -Xms256m -Xmx1g -XX:+UseG1GC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
    -cp "$KAFKA_CACHE/lib/*" "$@"
}

kafka_up() {
  if port_open $KAFKA_PORT; then log "kafka already answers on :$KAFKA_PORT"; return; fi
  command -v java >/dev/null || { log "installing java"; apt_install openjdk-17-jre-headless; }
  fetch_kafka
  mkdir -p "$LOCAL_DIR"
  local conf="$LOCAL_DIR/server.properties"
  { cat "$HERE/server.properties"; echo "log.dirs=$LOCAL_DIR/kafka-data"; } > "$conf"
  if [ ! -f "$LOCAL_DIR/kafka-data/meta.properties" ]; then
    log "formatting KRaft storage"
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid)
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$conf" >/dev/null
  fi
  log "starting kafka (log: $LOCAL_DIR/kafka.log)"
  nohup java -Xms512m -Xmx1g -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
    -cp "$KAFKA_CACHE/lib/*" kafka.Kafka "$conf" >"$LOCAL_DIR/kafka.log" 2>&1 &
  echo $! > "$LOCAL_DIR/kafka.pid"
  for _ in $(seq 1 120); do
    if port_open $KAFKA_PORT; then log "kafka up (pid $(cat "$LOCAL_DIR/kafka.pid"))"; return; fi
    pid_alive "$LOCAL_DIR/kafka.pid" kafka.Kafka || { tail -30 "$LOCAL_DIR/kafka.log" >&2; log "kafka died"; exit 1; }
    sleep 0.5
  done
  log "kafka did not open :$KAFKA_PORT in 60 s"; tail -30 "$LOCAL_DIR/kafka.log" >&2; exit 1
}

redis_up() {
  if port_open "$REDIS_PORT"; then log "redis already answers on :$REDIS_PORT"; return; fi
  command -v redis-server >/dev/null || { log "installing redis-server"; apt_install redis-server; }
  mkdir -p "$LOCAL_DIR"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --save '' --appendonly no \
    --pidfile "$LOCAL_DIR/redis.pid" --logfile "$LOCAL_DIR/redis.log" --dir "$LOCAL_DIR"
  for _ in $(seq 1 50); do
    if port_open "$REDIS_PORT"; then log "redis up (pid $(cat "$LOCAL_DIR/redis.pid" 2>/dev/null))"; return; fi
    sleep 0.1
  done
  log "redis did not start"; exit 1
}

stop_pid() {
  local name=$1 file=$2 program=$3
  if pid_alive "$file" "$program"; then
    local pid; pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    log "$name stopped (pid $pid)"
  else
    log "$name: nothing started by up is running"
  fi
  rm -f "$file"
}

status() {
  local rc=0
  if port_open $KAFKA_PORT; then echo "kafka: up on 127.0.0.1:$KAFKA_PORT$(pid_alive "$LOCAL_DIR/kafka.pid" kafka.Kafka && echo " (pid $(cat "$LOCAL_DIR/kafka.pid"))")"
  else echo "kafka: down"; rc=1; fi
  if port_open "$REDIS_PORT"; then echo "redis: up on 127.0.0.1:$REDIS_PORT$(pid_alive "$LOCAL_DIR/redis.pid" redis-server && echo " (pid $(cat "$LOCAL_DIR/redis.pid"))")"
  else echo "redis: down"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up)
    redis_up
    kafka_up
    log "creating topics"
    # Run on its own (not from demo.sh or test.sh), the project's virtualenv is made here: the topics are
    # created by the package.
    if [ -z "${PYTHON:-}" ]; then source "$HERE/env.sh"; fi
    "$PYTHON" -m worker.cli topics create
    ;;
  down)
    stop_pid kafka "$LOCAL_DIR/kafka.pid" kafka.Kafka
    stop_pid redis "$LOCAL_DIR/redis.pid" redis-server
    ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
