#!/usr/bin/env bash
# Brings one device call's $OUT/res.tgz (scripts/gpu_steps.sh) into this checkout's results/, so that the next call
# resumes the same sweeps: a fresh machine knows only what results/ carries, and without this step a `run --resume`
# there starts a second sweep of the scenario beside the first.
#
#   bash scripts/gpu_unpack.sh /work/.device/N/res.tgz
#
# Files that results/ lacks are added; a stored file is never replaced, except the derived tables (each sweep's
# runs.csv, a frontier's frontier.md, .csv and .json), which the call rewrote from every run it knew: the device's
# copy had this checkout's results/ and more, and the row of a run that `run --retry-failed` redid there: the row
# stored here is then byte for byte the failed attempt that the call brings back under runs/attempts/: the new row
# and log replace it, its log moves to logs/attempts/ (the machine's copy had moved it there too). Prints each sweep
# it touched.
set -eu
[ -f "${1:-}" ] || { echo "usage: bash scripts/gpu_unpack.sh RES_TGZ" >&2; exit 2; }
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
tar xzf "$1" -C "$t"
[ -d "$t/results" ] || { echo "$1 holds no results/" >&2; exit 2; }
for d in "$t"/results/*/; do
  n=$(basename "$d")
  mkdir -p "results/$n"
  # a retried run: the row stored here is byte for byte an attempt the call set aside, so its new row replaces it
  for a in "$d"runs/attempts/*.json; do
    [ -f "$a" ] || continue
    an=$(basename "$a" .json); k=${an%.*}
    cmp -s "$a" "results/$n/runs/$k.json" && [ -f "$d"runs/"$k".json ] || continue
    if [ -f "results/$n/logs/$k.log" ] && [ ! -f "results/$n/logs/attempts/$an.log" ]; then
      mkdir -p "results/$n/logs/attempts" && mv "results/$n/logs/$k.log" "results/$n/logs/attempts/$an.log"
    fi
    cp -p "$d"runs/"$k".json "results/$n/runs/$k.json"
    [ -f "$d"logs/"$k".log ] && cp -p "$d"logs/"$k".log "results/$n/logs/$k.log"
  done
  cp -rp --update=none "$d." "results/$n/" 2>/dev/null || cp -rpn "$d." "results/$n/"
  (cd "$d" && find . -type f \( -name runs.csv -o -name 'frontier.*' \) -print0) |
    while IFS= read -r -d '' f; do cp -p "$d$f" "results/$n/$f"; done
  echo "results/$n"
done
