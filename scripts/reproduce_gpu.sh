#!/usr/bin/env bash
# Reproduces the published GPU numbers (README, "Published numbers"): the GPU scenarios whose sweeps are kept in
# results/ run through `python -m harness run`, each in a new sweep of its own, on one GPU (the published ones: an
# H200 141GB). Run it from anywhere on the GPU machine; about an hour and a half on an H200.
#
#   bash scripts/reproduce_gpu.sh [DEADLINE_S]
#
# Environments: every toolkit trains in its own package overlay (docs/environments.md).
#   With PyPI:  pip install -e . && for e in base trl unsloth axolotl llamafactory litgpt lmeval; do
#                 python -m harness env create $e; done
#   Offline:    on a machine with PyPI, `python -m harness env pack all` writes .bundles/<env>.tar.xz, and the
#               wheels the harness itself needs beyond the box's Python (pydantic, bitsandbytes pruned to its CUDA
#               library) go in .whl/ (as wheels, or as pre-pruned trees .whl/*.tar.xz); this script installs both.
# A framework whose environment is missing is stored as an 'unavailable' row; the sweep goes on.
#
# A copy of the code without .git (`git archive` of one commit): export TUNEBENCH_GIT_SHA=<that commit> first, so
# every run records which commit it measured.
#
# Calls of limited length (a lent GPU machine that takes commands of a few minutes): DEADLINE_S seconds after the
# start, counting the set-up, the run in progress is interrupted (SIGINT: the runner stores what finished) and the
# script stops. Call it again, with the results of the earlier calls in results/, until it prints "all stored":
# sweeps created on or after REPRO_SINCE (UTC yyyymmdd, default today) are this reproduction's and are filled
# in, never started again; the sweeps committed in results/ are never written to. When $OUT is set (a machine
# that hands files back through it), this reproduction's sweeps are packed into $OUT/results.tgz after each call.
#
# Afterwards: python -m harness compare results/llama8b_lora-20261123-174028 results/llama8b_lora-<new run-id>
set -u
cd "$(dirname "$0")/.."
end=$(( $(date +%s) + ${1:-1000000} ))
since=${REPRO_SINCE:-$(date -u +%Y%m%d)}

# --- set-up (what the GPU box lacks) -----------------------------------------------------------------------------
site=/tmp/site
mkdir -p "$site"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
for t in .whl/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C "$site"; done
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1  # the runner's progress reaches the terminal through the grep in step()
for b in base trl unsloth axolotl llamafactory litgpt lmeval; do  # once per machine: an env.json marks it installed
  if [ -f ".bundles/$b.tar.xz" ] && [ ! -f "${TUNEBENCH_ENVS:-.envs}/$b/env.json" ]; then
    python3 -m harness env install ".bundles/$b.tar.xz" >/dev/null 2>&1 || echo "bundle $b: not installed"
  fi
done

# --- the sweeps --------------------------------------------------------------------------------------------------
ours() {  # ours NAME: this reproduction's sweeps of scenario NAME (run-id date on or after $since), oldest first
  for d in results/"$1"-*/; do
    [ -d "$d" ] || continue
    id=$(basename "$d"); [[ ${id#"$1"-} > "$since" ]] && echo "$d"  # yyyymmdd-HHMMSS > yyyymmdd: same day on
  done
}
stopped=0
step() {  # step SCENARIO ARGS..: one `harness run` into this reproduction's sweep of SCENARIO, within the deadline
  local name left mode=--resume
  name=$(basename "$1" .yaml)
  left=$(( end - $(date +%s) )); if [ $left -le 20 ]; then stopped=1; return 1; fi
  # the first run of a scenario starts a new sweep; later ones fill it in (--resume never starts a duplicate)
  [ -z "$(ours "$name")" ] && mode=--new
  timeout -s INT $left python3 -m harness run "$@" $mode --no-report 2>&1 | grep -v "━"
  [ "${PIPESTATUS[0]}" = 124 ] && stopped=1
  return 0
}

# The 8B scenarios: hf first (the baseline of every ratio), then three repeats of hf, Unsloth's two modes and every
# tunebench row, then one repeat of every other row (peers' default and best-setting rows). About 39 runs of ~50 s
# each per scenario on an H200: one scenario per 35 minutes of a lent machine.
for sc in scenarios/llama8b_lora.yaml scenarios/llama8b_qlora.yaml; do
  ours_rows=$(python3 -c "from harness.spec.scenario import load_scenario as l
print(' '.join(f.key for f in l('$sc').frameworks if f.name == 'tunebench'))")  # every tunebench row of the file
  step $sc --repeats 1 --only hf
  step $sc --repeats 3 --only hf unsloth unsloth-plain-ckpt $ours_rows
  step $sc --repeats 1
done
# lm-eval runs in the lmeval environment; three seeds for hf and tunebench, one for the others
step scenarios/quality_gpu.yaml --only hf tunebench --repeats 3
step scenarios/quality_gpu.yaml --repeats 1
step scenarios/quality_gpu_parity.yaml   # hf twice against tunebench with and without reference ops

mine=$(for n in llama8b_lora llama8b_qlora quality_gpu quality_gpu_parity; do ours $n | tail -1; done)
[ -n "${OUT:-}" ] && [ -n "$mine" ] && tar czf "$OUT/results.tgz" $mine
if [ $stopped = 1 ]; then
  echo "stopped at the deadline: call again (REPRO_SINCE=$since) to continue these sweeps:" $mine
  exit 0
fi
for d in $mine; do python3 -m harness report "$d"; done
echo "all stored:" $mine
