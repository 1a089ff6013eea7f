#!/usr/bin/env bash
# Runs a list of harness commands on a lent GPU machine within one call's deadline, from a clean copy of one commit,
# and packs the sweeps it touched into $OUT/res.tgz; the next call (warm machine or fresh) carries on where it
# stopped, because every sweep resumes, on the same kind of GPU only (a sweep, matrix or frontier started on an H100
# is not filled in on an H200: name one machine kind for all the calls that fill one sweep).
#
#   B=570 bash scripts/gpu_steps.sh NAME STEPS_FILE        (e.g. NAME = n for .work/n.tgz)
#
# NAME: of the archive .work/NAME.tgz (the name, not the path) made here with `git archive --format=tar.gz COMMIT -- . ':!results' ':!reports'`, and
#   .work/NAME.sha holding COMMIT: the runs execute in /tmp/clean-NAME (kept between calls on a warm machine) and
#   record that commit (TUNEBENCH_GIT_SHA). The files of results/ that the clean copy lacks are copied into it
#   first, so a sweep resumes from what the last call brought back; the sweeps a call wrote to come back whole.
# STEPS_FILE: one command per line, run in the clean copy in order, each interrupted (SIGINT: the runner stores what
#   finished) when B seconds since the call's start are spent; `$R` is this checkout on the machine, `$LEFT` the
#   seconds the step has (a frontier given `--time-limit-s $((LEFT - 20))` starts no probe it would not finish, so
#   the interrupt finds none half done). A line
#   "@NAME" moves the following lines to the clean copy of .work/NAME.tgz (one call can run a check at one commit
#   and resume a sweep made from another).
# $OUT/res.tgz is packed after each step and every 45 s, so a call killed at its limit still returns what finished.
# Between calls, `bash scripts/gpu_unpack.sh FILES_AT/res.tgz` brings it into results/ here: the next call (often on
#   a fresh machine) resumes from what this checkout's results/ holds, and would otherwise start new sweeps.
# Set-up on a fresh machine (~50 s): what the harness process itself lacks there (pydantic with pydantic_core,
#   annotated-types, typing-inspection) into /tmp/site, from .whl/*.whl where carried, else taken out of the base
#   bundle, which holds the same wheels; and every .bundles/*.tar.xz (`python -m harness env pack all`) into
#   /tmp/envs. The device call names .bundles and .work in its carry: with results/ they must stay within the
#   64 MiB that travels (leave out the bundles a call's steps do not use, e.g. litgpt and lmeval). In practice the
#   check refuses far less than 64 MiB of tracked files plus carry: with this repository, base + trl + unsloth +
#   .work (12 MB) and axolotl + .work (14 MB) travelled, base + llamafactory + trl + unsloth + .work (19 MB) and
#   base + axolotl + .work (20 MB) did not. A warm machine keeps /tmp/site and /tmp/envs between calls, and a bundle
#   installed there is not installed again: a call that carries base, then one within its 30 s idle that carries
#   axolotl alone, has both.
set -u
t0=$(date +%s)
B=${B:-560}
# a device call is killed at 600 s: a budget past ~590 s would be cut before the last step's interrupt and pack
if [ "$B" -gt 590 ]; then echo "B=$B is past a call's 600 s; using 590"; B=590; fi
R=$PWD
A=$1
S=$2
[ -f "$R/.work/$A.tgz" ] || { echo "no archive .work/$A.tgz: give its NAME (e.g. n), not a path"; exit 2; }
export TUNEBENCH_ENVS=/tmp/envs TUNEBENCH_WORK=/tmp/tbwork TUNEBENCH_CACHE=/tmp/tbcache PYTHONUNBUFFERED=1
export CUDA_DEVICE_ORDER=PCI_BUS_ID HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# the harness process's own wheels: .whl/ where it was carried, else the same wheels out of the base bundle
if [ ! -f /tmp/site/.done ] && ! compgen -G ".whl/*.whl" >/dev/null && [ -f .bundles/base.tar.xz ]; then
  mkdir -p /tmp/basewhl && tar xJf .bundles/base.tar.xz -C /tmp/basewhl --wildcards --no-anchored \
    'pydantic*.whl' 'annotated_types*.whl' 'typing_inspection*.whl' && mkdir -p .whl \
    && cp /tmp/basewhl/wheels/*.whl .whl/
fi
if [ ! -f /tmp/site/.done ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site
for b in .bundles/*.tar.xz; do
  [ -f "$b" ] || continue
  n=$(basename "$b" .tar.xz)
  [ -f "/tmp/envs/$n/env.json" ] || (python3 -m harness env install "$b" >"/tmp/envinst-$n.log" 2>&1 \
    || echo "bundle $n not installed: $(tail -2 "/tmp/envinst-$n.log")") &
done
wait
echo "set-up done at $(( $(date +%s) - t0 )) s"
stamp=$(mktemp) && touch "$stamp"
used=$(mktemp)  # the clean copies entered, one per line (read by the packer in the background too)
# every sweep a step wrote to, from each clean copy used (the same sweep twice: the later copy's files win), into
# $OUT/res.tgz, replaced whole: after each step and every 45 s, so a call that its limit kills still brings back
# what finished (a selfcheck's or a sweep's work files included: the next call resumes from them)
pack() {
  [ -n "${OUT:-}" ] || return 0
  local args=() c mine
  while IFS= read -r c; do
    mapfile -t mine < <(cd "$c" && find results -newer "$stamp" -type f | cut -d/ -f1-2 | sort -u)
    [ ${#mine[@]} -gt 0 ] && args+=(-C "$c" "${mine[@]}")
  done < "$used"
  [ ${#args[@]} -gt 0 ] && tar czf "$OUT/.res.tgz.$BASHPID" --exclude=sweep.lock "${args[@]}" 2>/dev/null \
    && mv "$OUT/.res.tgz.$BASHPID" "$OUT/res.tgz"
  return 0
}
(while sleep 45; do pack; done) >/dev/null 2>&1 &
packer=$!
# the clean copy of archive $1, the current directory from here on; the files of results/ it lacks copied in first
# (a warm machine's copy gets what another copy wrote since, e.g. a selfcheck.json, so a later check numbers past it)
enter() {
  C=/tmp/clean-$1
  if [ ! -f "$C/.sha" ]; then
    rm -rf "$C" && mkdir -p "$C" && tar xzf "$R/.work/$1.tgz" -C "$C" && cp "$R/.work/$1.sha" "$C/.sha" || return 1
  fi
  TUNEBENCH_GIT_SHA=$(cat "$C/.sha")
  export TUNEBENCH_GIT_SHA
  mkdir -p "$C/results"
  for d in "$R"/results/*/; do
    d=${d%/}
    # files it has (its own, newer) are kept; -p: the copies are older than the stamp. Newer coreutils warn about -n
    # on every call and want --update=none, which older ones reject
    cp -rp --update=none "$d" "$C/results/" 2>/dev/null || cp -rpn "$d" "$C/results/"
  done
  # a row that a step here set aside (byte for byte under runs/attempts/) stays aside: the copy brought it back
  while IFS= read -r -d '' a; do
    an=$(basename "$a" .json); k=${an%.*}; r=${a%/attempts/*}; s=${r%/runs}
    if cmp -s "$a" "$r/$k.json"; then rm -f "$r/$k.json"; fi
    if cmp -s "$s/logs/attempts/$an.log" "$s/logs/$k.log"; then rm -f "$s/logs/$k.log"; fi
  done < <(find "$C/results" -path '*/runs/attempts/*.json' -print0)
  grep -qxF "$C" "$used" || echo "$C" >> "$used"
  cd "$C" || return 1
}
export R
enter "$A" || exit 1
while IFS= read -r line; do
  [ -z "$line" ] && continue
  if [[ $line == @* ]]; then  # "@NAME": the following lines run in the clean copy of .work/NAME.tgz
    enter "${line#@}" || { echo "no archive .work/${line#@}.tgz"; exit 1; }
    echo "=== now in $C ($(cat "$C/.sha"))"
    continue
  fi
  left=$(( t0 + B - $(date +%s) ))
  if [ $left -le 30 ]; then echo "deadline: not started: $line"; continue; fi
  echo "=== [$(( $(date +%s) - t0 )) s] $line (${left} s left)"
  LEFT=$left timeout -s INT $left bash -c "$line" 2>&1 | grep -v "━" | tail -"${TAILN:-40}"
  echo "=== exit ${PIPESTATUS[0]}"
  pack
done < "$R/$S"
pack
kill "$packer" 2>/dev/null
echo "done at $(( $(date +%s) - t0 )) s"
