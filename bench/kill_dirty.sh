#!/bin/bash
# Does dirty page cache on Docker's filesystem hold `docker kill` of an unrelated container?
# A small Redis container is killed 3 times with 512 MB just written (dirty) into a plain
# volume, alternated with 3 times after a `sync`. Run it alone on the machine (a timing).
set -euo pipefail
tag=orkestr-killdirty-$$
src=$(mktemp)
cleanup() {
  docker rm -f -v "$tag-c" >/dev/null 2>&1 || true
  docker volume rm "$tag-v" >/dev/null 2>&1 || true
  rm -f "$src"
}
trap cleanup EXIT
head -c 512M /dev/urandom >"$src"
sync "$src"
docker volume create --label "orkestr.host=$tag" "$tag-v" >/dev/null
mp=$(docker volume inspect -f '{{.Mountpoint}}' "$tag-v")
docker run -d --name "$tag-c" --label "orkestr.host=$tag" --network none \
  orkestr-local/redis:7 >/dev/null
sleep 1
for _ in 1 2 3; do
  for mode in dirty clean; do
    cp "$src" "$mp/x"
    if [[ $mode == clean ]]; then sync; fi
    dirty=$(awk '/^Dirty:/ {print $2}' /proc/meminfo)
    s=$(date +%s.%N)
    docker kill "$tag-c" >/dev/null
    e=$(date +%s.%N)
    echo "$mode dirty_kb=$dirty kill_s=$(echo "$e - $s" | bc) load=$(cut -d' ' -f1 /proc/loadavg)"
    rm -f "$mp/x"
    sync
    docker start "$tag-c" >/dev/null
    sleep 0.5
  done
done
