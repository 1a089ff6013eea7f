#!/usr/bin/env bash
# Exploratory device call (not a published sweep): trainer step profiles of the current code and the
# toolkit rows that never ran on the GPU, into a scratch results root packed as $OUT/probe.tgz.
#   bash scripts/gpu_probe.sh DEADLINE_SECONDS
source scripts/gpu_setup.sh
end=$(( $(date +%s) + ${1:-540} ))
mkdir -p /tmp/probe
left() { echo $(( end - $(date +%s) )); }
timeout $(( $(left) - 30 )) python3 -m kernels.trainer.profile_step --runs lora,qlora --steps 10 --warmup 3 \
  --profile-steps 1 --out /tmp/probe/prof_base.json 2>&1 | tail -5
timeout $(( $(left) - 30 )) python3 -m kernels.trainer.profile_step --runs lora,qlora --steps 10 --warmup 3 \
  --profile-steps 1 --knobs '{"recompute_layers": 4}' --out /tmp/probe/prof_fast.json 2>&1 | tail -5
for fw in axolotl llamafactory litgpt; do
  l=$(left); [ $l -gt 60 ] || break
  timeout -s INT $(( l - 20 )) python3 -m harness run scenarios/llama8b_qlora.yaml --only $fw --repeats 1 \
    --results /tmp/probe/results --no-report 2>&1 | grep -v "━" | tail -8
done
cd /tmp/probe && tar czf "$OUT/probe.tgz" . ; exit 0
