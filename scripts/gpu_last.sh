#!/usr/bin/env bash
# A short device call (session 4's last): the hf-against-itself and tunebench repeats of the parity bisection,
# then the 8B LoRA rows of the new trainer code next to hf in a new sweep (toolkit rows: the session-3 sweep).
#   bash scripts/gpu_last.sh DEADLINE_SECONDS
end=$(( $(date +%s) + ${1:-540} ))  # the deadline counts the setup too
source scripts/gpu_setup.sh
step scenarios/quality_gpu_parity.yaml --only hf tunebench
step scenarios/llama8b_lora.yaml --repeats 1 --only hf tunebench-fast-graph tunebench-graph tunebench-fast tunebench
[ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" results
exit 0
