#!/usr/bin/env bash
# Exploratory device call (not a published sweep): trainer step profiles of the current code, packed as
# $OUT/probe.tgz (untar into results/trainer_profile_h100-<date>/ and commit).
#   bash scripts/gpu_probe.sh DEADLINE_SECONDS
# Now (session 4's changes, never run on a GPU): the whole step as one CUDA graph (cuda_graph) and the A/B of
# group_projections (q/k/v and gate/up as one LoRA call each), on the fast row's setting (4 of 32 layers
# recompute) and on full recomputation, with one profiled step each; then the rms_norm backward's
# registers/spills (kernels/NOTES.md, "rms_norm"). Most informative first: the deadline cuts the tail.
end=$(( $(date +%s) + ${1:-540} ))  # the deadline counts the setup too
source scripts/gpu_setup.sh
mkdir -p /tmp/probe
left() { echo $(( end - $(date +%s) )); }
prof() {  # prof NAME RUNS KNOBS_JSON
  l=$(left); [ $l -gt 60 ] || return 1
  timeout $(( l - 30 )) python3 -m kernels.trainer.profile_step --runs $2 --steps 10 --warmup 3 \
    --profile-steps 1 --knobs "$3" --out /tmp/probe/prof_$1.json 2>&1 | tail -4
}
# the GPU-only tests first (~1-2 min): CUDA-graph capture vs eager, flash varlen vs block mask, bf16 ops
TRITON_INTERPRET=0 timeout $(( $(left) > 300 ? 240 : $(left) / 3 )) python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels \
  > /tmp/probe/gpu_tests.txt 2>&1; tail -15 /tmp/probe/gpu_tests.txt
prof fast_graph lora,qlora '{"recompute_layers": 4, "cuda_graph": true}'
prof fast_grouped lora,qlora '{"recompute_layers": 4}'
prof all_graph lora,qlora '{"cuda_graph": true}'
prof fast_single lora '{"recompute_layers": 4, "group_projections": false}'
prof all_grouped lora '{}'
prof all_single lora '{"group_projections": false}'
l=$(left)
[ $l -gt 40 ] && timeout $(( l - 20 )) python3 - > /tmp/probe/rms_norm_regs.txt 2>&1 <<'PY'
# Is rms_norm's backward slow on the GPU, or is the bench's fwd+bwd (0.596 ms against a ~45 us floor) host time
# of the autograd call? Kernel launches alone, with do_bench and with do_bench_cudagraph (no host time), then
# registers/spills of the compiled kernels.
import torch, triton.testing as tt
from kernels.ops.rms_norm import rms_norm, rms_norm_backward, rms_norm_forward
x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.ones(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn_like(x)
y, h, rstd = rms_norm_forward(x.detach(), w.detach(), 1e-5)
cases = {"fwd kernel": lambda: rms_norm_forward(x.detach(), w.detach(), 1e-5),
         "bwd kernel + dw sum": lambda: rms_norm_backward(dy, h, w.detach(), rstd),
         "autograd fwd+bwd": lambda: torch.autograd.backward(rms_norm(x, w, 1e-5), dy)}
for name, fn in cases.items():
    fn(); torch.cuda.synchronize()
    ms = tt.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=[x, w])
    try:
        g = tt.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=[x, w])
    except Exception as e:  # autograd inside a graph capture may refuse
        g = repr(e)[:200]
    print(f"{name}: do_bench {ms} ms; do_bench_cudagraph {g} ms (floor fwd ~0.045, bwd ~0.07 at 3 TB/s)")
import kernels.ops.rms_norm as m
for name in dir(m):  # every compiled Triton kernel of the module: registers and spills per specialisation
    fn = getattr(m, name)
    for dev_cache in getattr(getattr(fn, "device_caches", None) or {}, "values", lambda: [])():
        for key, k in dev_cache[0].items():
            print(name, "n_regs", getattr(k, "n_regs", None), "n_spills", getattr(k, "n_spills", None),
                  "num_warps", getattr(getattr(k, "metadata", None), "num_warps", None))
PY
cd /tmp/probe && tar czf "$OUT/probe.tgz" . ; exit 0
