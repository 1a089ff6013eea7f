"""``python -m harness calibrate``: measure the GPU's dense bf16 matmul rate, the MFU denominator's check.

Times an N x N x N bf16 product on fresh random data with ``triton.testing.do_bench`` (median of many
launches after warm-up). Datasheet peaks (harness.measuring.flops) are what MFU uses by default; this tells how far
the card as found is from them (seen: ~800 of 989 TFLOP/s on an H100 SXM).
"""

from __future__ import annotations

from harness.measuring.flops import peak_tflops_for


def measure(size: int = 8192) -> dict:
    import torch
    import triton.testing

    if not torch.cuda.is_available():
        raise RuntimeError("calibrate needs a CUDA GPU")
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode="median")
    tflops = 2 * size**3 / (ms / 1e3) / 1e12
    name = torch.cuda.get_device_name(0)
    table, src = peak_tflops_for(name)
    return {"gpu_name": name, "size": size, "median_ms": ms, "measured_tflops": tflops, "table_tflops": table,
            "table_source": src, "fraction_of_table": tflops / table if table else None}

