#!/usr/bin/env bash
# Exploratory device call (not a published sweep): GPU-only tests, op benchmarks and trainer step profiles of the
# current code, packed as $OUT/probe.tgz (untar into results/trainer_profile_h100-<date>/ and commit).
#   bash scripts/gpu_probe.sh DEADLINE_SECONDS
# Now (session 6): the blocked NF4 dequant kernel, never run on a GPU: its GPU-only tests, every launch variant
# in the bench, then the fast-graph QLoRA step with the flat kernel and with the bench's fastest variant
# (TUNEBENCH_NF4_DEQUANT, same machine); then fewer recomputing layers (recompute_layers 2 and 1) for LoRA and
# QLoRA. Most informative first: the deadline cuts the tail.
end=$(( $(date +%s) + ${1:-540} ))  # the deadline counts the setup too
source scripts/gpu_setup.sh
mkdir -p /tmp/probe
left() { echo $(( end - $(date +%s) )); }
prof() {  # prof NAME RUNS KNOBS_JSON [PROFILE_STEPS]
  l=$(left); [ $l -gt 60 ] || return 1
  timeout $(( l - 30 )) python3 -m kernels.trainer.profile_step --runs $2 --steps 12 --warmup 4 \
    --profile-steps ${4:-0} --knobs "$3" --out /tmp/probe/prof_$1.json 2>&1 | grep -E "^(lora|qlora)" | tail -4
}
TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_ops_nf4.py \
  > /tmp/probe/gpu_tests_nf4.txt 2>&1; tail -3 /tmp/probe/gpu_tests_nf4.txt
timeout 180 python3 -m kernels.bench.bench_ops --ops nf4_dequant --out /tmp/probe/bench_nf4 > /dev/null 2>&1
# the fastest blocked variant at the largest shape (gate/up/down: ~80 % of the dequantised bytes)
best=$(python3 - <<'PY'
import json, sys
rows = json.load(open("/tmp/probe/bench_nf4.json"))["rows"]
ok = {r["provider"]: r for r in rows if "ms" in r}
for p in ["ours_flat", *sorted((p for p in ok if p.startswith("ours_r") and "@" not in p), key=lambda p: ok[p]["ms"])[:3]]:
    print(p, *(f"{ok[q]['ms']:.4f}" for q in (p, p + "@4096x4096", p + "@1024x4096") if q in ok), file=sys.stderr)
b = min((p for p in ok if p.startswith("ours_r") and "@" not in p), key=lambda p: ok[p]["ms"])
r, rest = b[len("ours_r"):].split("w")
print(json.dumps({"flat": False, "rows": int(r), "num_warps": int(rest[:-1]), "lookup": "gst".index(rest[-1])}))
PY
)
echo "fastest blocked variant: $best"; echo "$best" > /tmp/probe/nf4_best.json
TUNEBENCH_NF4_DEQUANT='{"flat": true}' prof qlora_flat qlora '{"recompute_layers": 4, "cuda_graph": true}'
TUNEBENCH_NF4_DEQUANT="$best" prof qlora_blocked qlora '{"recompute_layers": 4, "cuda_graph": true}' 1
prof lora_r4 lora '{"recompute_layers": 4, "cuda_graph": true}'
prof lora_r2 lora '{"recompute_layers": 2, "cuda_graph": true}'
prof lora_r1 lora '{"recompute_layers": 1, "cuda_graph": true}' 1
TUNEBENCH_NF4_DEQUANT="$best" prof qlora_blocked_r1 qlora '{"recompute_layers": 1, "cuda_graph": true}'
TUNEBENCH_NF4_DEQUANT="$best" prof qlora_blocked_r2 qlora '{"recompute_layers": 2, "cuda_graph": true}'
cd /tmp/probe && tar czf "$OUT/probe.tgz" . ; exit 0
