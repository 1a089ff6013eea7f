#!/usr/bin/env bash
# One device call of the published GPU sweep; rerun it until everything is stored (the runner resumes).
#   bash scripts/gpu_sweep.sh DEADLINE_SECONDS     (then: tar xzf <files_at>/results.tgz, commit, call again)
#   RETRY=1 bash scripts/gpu_sweep.sh ...           (also redo runs stored as error/crashed/timeout, e.g. disk full)
#   NEW8B=TAG bash scripts/gpu_sweep.sh ...         (measure changed code: start new 8B sweeps once per TAG; the
#                                                    marker results/.new8b-TAG travels back in results.tgz, so
#                                                    later calls with the same TAG resume those sweeps)
# The device syncs its copy of the repository with yours at every call, deleting result directories it
# does not have here: everything stored is packed into $OUT/results.tgz at the end of each call.
# Session 4 added rows to both 8B scenarios (tunebench-graph, tunebench-fast-graph): their hash changed, so the
# next call starts new 8B sweeps by itself (the session-3 sweeps stay as they are).
# Order: the GPU quality scenario and its parity bisection first (they resume: the sweeps of session 3 lack
# trl/unsloth/axolotl/llamafactory and the bisection), then per 8B scenario r0 of every framework and the extra
# repeats of hf, tunebench and tunebench-fast (each scenario's sweep finishes on one machine: a machine goes
# back after 30 min held), then (time left) the per-op micro-benchmarks of ops changed since the last run.
end=$(( $(date +%s) + ${1:-540} ))  # the deadline counts the setup too
source scripts/gpu_setup.sh
step scenarios/quality_gpu.yaml  # evaluates with the lmeval bundle
step scenarios/quality_gpu_parity.yaml  # bisects tunebench's bf16 full-FT departure (kernels/NOTES.md)
for sc in scenarios/llama8b_lora.yaml scenarios/llama8b_qlora.yaml; do
  name=$(basename $sc .yaml)
  if [ -n "${NEW8B:-}" ] && [ ! -f results/.new8b-$NEW8B-$name ]; then
    mkdir -p results && touch results/.new8b-$NEW8B-$name
    step --new $sc --repeats 1 --only hf  # creates the sweep (hf first: the baseline of every ratio)
  fi
  step $sc --repeats 1 ;
  step $sc --only hf tunebench tunebench-fast tunebench-fast-graph --repeats 3 ;
done
left=$(( end - $(date +%s) ))
if [ $left -gt 90 ] && [ ! -f results/kernels_bench_h100-session4/bench_ops.md ]; then
  mkdir -p results/kernels_bench_h100-session4
  timeout $(( left - 30 )) python3 -m kernels.bench.bench_ops --out results/kernels_bench_h100-session4/bench_ops \
    --ops lora_qkv lora_linear rms_norm 2>&1 | tail -20
fi
[ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" results
exit 0
