#!/usr/bin/env bash
# One device call of the published GPU sweep; rerun it until everything is stored (the runner resumes).
#   bash scripts/gpu_sweep.sh DEADLINE_SECONDS     (then: tar xzf <files_at>/results.tgz, commit, call again)
#   RETRY=1 bash scripts/gpu_sweep.sh ...           (also redo runs stored as error/crashed/timeout, e.g. disk full)
# The device syncs its copy of the repository with yours at every call, deleting result directories it
# does not have here: everything stored is packed into $OUT/results.tgz at the end of each call.
# Order: per 8B scenario, r0 of every framework, then the extra repeats of hf, tunebench and tunebench-fast (so each
# scenario's sweep finishes on one machine: a machine goes back after 30 min held), then the GPU quality
# scenario, then (time left) a rerun of the per-op micro-benchmarks of the ops changed since the last one
# (rms_norm backward grid, lora_linear precision).
source scripts/gpu_setup.sh
end=$(( $(date +%s) + ${1:-540} ))
step() {  # run one harness command with what is left of the deadline (SIGINT: the runner stops cleanly)
  left=$(( end - $(date +%s) )); [ $left -gt 20 ] || return 1
  timeout -s INT $left python3 -m harness run "$@" --resume ${RETRY:+--retry-failed} --no-report 2>&1 | grep -v "━"
}
for sc in scenarios/llama8b_lora.yaml scenarios/llama8b_qlora.yaml; do
  step $sc --repeats 1 ;
  step $sc --only hf tunebench --repeats 3 ;
done
step scenarios/quality_gpu.yaml  # evaluates with the lmeval bundle
step scenarios/quality_gpu_parity.yaml  # bisects tunebench's bf16 full-FT departure (kernels/NOTES.md)
step scenarios/llama8b_lora.yaml --only tunebench-fast --repeats 3 ;
left=$(( end - $(date +%s) ))
if [ $left -gt 90 ] && [ ! -f results/kernels_bench_h100-rerun/bench_ops.md ]; then
  mkdir -p results/kernels_bench_h100-rerun
  timeout $(( left - 30 )) python3 -m kernels.bench.bench_ops --out results/kernels_bench_h100-rerun/bench_ops \
    --ops rms_norm lora_linear 2>&1 | tail -20
fi
[ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" results
exit 0
