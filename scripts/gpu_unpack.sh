#!/usr/bin/env bash
# Brings one device call's $OUT/res.tgz (scripts/gpu_steps.sh) into this checkout's results/, so that the next call
# resumes the same sweeps: a fresh machine knows only what results/ carries, and without this step a `run --resume`
# there starts a second sweep of the scenario beside the first.
#
#   bash scripts/gpu_unpack.sh /work/.device/N/res.tgz
#
# Files that results/ lacks are added; a stored file is never replaced, except:
# - the derived tables (each sweep's runs.csv, a frontier's frontier.md, .csv and .json, a matrix's matrix.csv and
#   not_run.json), which the call rewrote from every run it knew: the device's copy had this checkout's results/
#   and more;
# - a sweep's plan (sweep.json): the names it plans only grow (`run --resume --only ...` adds rows), so the plan here
#   gains the names the call's plan adds;
# - the row of a run that `--retry-failed` (or a matrix's `--retry-invalid`) redid there: the row stored here is
#   then byte for byte the attempt that the call brings back under runs/attempts/: the new row and log replace it,
#   its log moves to logs/attempts/ (the machine's copy had moved it there too);
# - the row of a probe that `frontier --redo-older` set aside there without redoing it: it moves under
#   runs/attempts/ here too, as the same attempt (an attempt stored here already under another number is not added
#   a second time).
# Every sweep is handled where it stands: a matrix or frontier folder holds one sweep per row. Prints each top
# folder it touched.
set -eu
[ -f "${1:-}" ] || { echo "usage: bash scripts/gpu_unpack.sh RES_TGZ" >&2; exit 2; }
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
tar xzf "$1" -C "$t"
[ -d "$t/results" ] || { echo "$1 holds no results/" >&2; exit 2; }
# the plan here, with the names the call's plan adds after its own (argv: the call's sweep.json, ours)
merge_plan='
import json, sys
theirs, ours = (json.load(open(p)) for p in sys.argv[1:])
mine = ours.get("planned") if isinstance(ours.get("planned"), list) else []
more = [k for k in theirs.get("planned") or [] if isinstance(k, str) and k not in mine]
if more:
    ours["planned"] = mine + more
    tmp = sys.argv[2] + ".tmp"
    open(tmp, "w").write(json.dumps(ours, indent=1))
    import os; os.replace(tmp, sys.argv[2])
'
for d in "$t"/results/*/; do
  n=$(basename "$d")
  mkdir -p "results/$n"
  while IFS= read -r -d '' rd; do
    s=${rd%/runs}
    here=${s#"$t"/}  # results/<n>[/<row's sweep>]
    for a in "$rd"/attempts/*.json; do
      [ -f "$a" ] || continue
      an=$(basename "$a" .json); k=${an%.*}
      # an attempt stored here under another number (an earlier call brought it back) is not copied twice
      dup=
      for l in "$here"/runs/attempts/"$k".*.json; do
        [ -f "$l" ] && [ "${l##*/}" != "$an.json" ] && cmp -s "$a" "$l" && dup=1
      done
      if [ -n "$dup" ]; then rm -f "$a" "$s/logs/attempts/$an.log"; continue; fi
      # the row stored here is byte for byte an attempt the call set aside: its log goes beside the attempt, and
      # the call's new row replaces it (a retried run), or, where the call set it aside without one (`frontier
      # --redo-older`), the row goes under attempts/ as it did there
      cmp -s "$a" "$here/runs/$k.json" || continue
      if [ -f "$here/logs/$k.log" ] && [ ! -f "$here/logs/attempts/$an.log" ]; then
        mkdir -p "$here/logs/attempts" && mv "$here/logs/$k.log" "$here/logs/attempts/$an.log"
      fi
      if [ -f "$rd/$k.json" ]; then
        cp -p "$rd/$k.json" "$here/runs/$k.json"
        if [ -f "$s/logs/$k.log" ]; then cp -p "$s/logs/$k.log" "$here/logs/$k.log"; fi
      elif [ -f "$here/runs/attempts/$an.json" ]; then
        rm "$here/runs/$k.json"
      else
        mkdir -p "$here/runs/attempts" && mv "$here/runs/$k.json" "$here/runs/attempts/$an.json"
      fi
    done
  done < <(find "$d" -type d -name runs -not -path '*/attempts/*' -print0)
  while IFS= read -r -d '' f; do
    if [ -f "results/$n/$f" ]; then python3 -c "$merge_plan" "$d$f" "results/$n/$f"; fi
  done < <(cd "$d" && find . -type f -name sweep.json -print0)
  cp -rp --update=none "$d." "results/$n/" 2>/dev/null || cp -rpn "$d." "results/$n/"
  (cd "$d" && find . -type f \( -name runs.csv -o -name 'frontier.*' -o -name matrix.csv -o -name not_run.json \) \
    -print0) | while IFS= read -r -d '' f; do cp -p "$d$f" "results/$n/$f"; done
  echo "results/$n"
done
