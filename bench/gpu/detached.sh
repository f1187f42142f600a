#!/usr/bin/env bash
# Long GPU runs across device commands (each is limited to 10 minutes; the machine stays while calls follow
# each other within its idle window). A run is a command started in its own session, so that it outlives the
# device command that started it, with OUT set to its own folder:
#   bash bench/gpu/detached.sh start NAME [--wait S] -- CMD...   # e.g. -- bash bench/gpu/run.sh fidelity --shapes cone
#   bash bench/gpu/detached.sh wait [--wait S] NAME...           # until every named run has ended, or S seconds
# Both return as soon as every named run has ended (a failed run ends early too: nothing waits on a dead job), print
# each run's status and log tail, and pack its folder into $OUT/NAME.tgz (one file a run: the device returns only a
# few files per call). Default S: 540.
set -euo pipefail
root=${MAGIC3D_DETACHED_DIR:-/tmp/magic3d-detached}
wait_s=540

usage() { echo "usage: $0 start NAME [--wait S] -- CMD... | wait [--wait S] NAME..." >&2; exit 2; }

status() {  # NAME -> running | exited RC
  local dir="$root/$1"
  if [ -f "$dir/rc" ]; then echo "exited $(cat "$dir/rc")"
  elif [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then echo running
  else echo "exited unknown"; fi
}

wait_for() {  # NAME... ; waits up to $wait_s seconds, then reports and copies
  local began=$SECONDS name busy
  while :; do
    busy=0
    for name in "$@"; do [ "$(status "$name")" = running ] && busy=1; done
    [ "$busy" = 0 ] || [ $((SECONDS - began)) -ge "$wait_s" ] && break
    sleep 5
  done
  for name in "$@"; do
    echo "== $name: $(status "$name") after $((SECONDS - began)) s of waiting"
    tail -n 5 "$root/$name/run.log" 2>/dev/null | cut -c1-400 || true
    # A running job's log grows while it is packed: tar says so (exit 1), and the other runs must still be packed.
    if [ -n "${OUT:-}" ]; then
      mkdir -p "$OUT"
      tar czf "$OUT/$name.tgz" --warning=no-file-changed -C "$root/$name" . || echo "(packing $name: tar exit $?)"
    fi
  done
}

[ $# -ge 1 ] || usage
case "$1" in
  start)
    [ $# -ge 2 ] || usage
    name=$2; shift 2
    if [ "${1:-}" = --wait ]; then wait_s=$2; shift 2; fi
    [ "${1:-}" = -- ] || usage
    shift
    [ $# -ge 1 ] || usage
    dir="$root/$name"
    mkdir -p "$dir/out"
    # setsid: its own session, so the run survives the end of this device command; rc is written when it ends.
    setsid nohup bash -c 'OUT="$1/out" "${@:2}"; echo $? > "$1/rc"' _ "$dir" "$@" > "$dir/run.log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    wait_for "$name" ;;
  wait)
    shift
    if [ "${1:-}" = --wait ]; then wait_s=$2; shift 2; fi
    [ $# -ge 1 ] || usage
    wait_for "$@" ;;
  *) usage ;;
esac
