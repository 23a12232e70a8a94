"""Which GEMM form computes PaCA's dDelta = s * g^T x[..., idx] fastest (Llama-3-8B shapes, T=2048, r=16).

    python bench/paca_grad_gemm.py      # GPU; writes bench/results/paca_grad_gemm.json

Compares, per projection shape, in one run: the frozen layer's dX GEMM (g @ W, the cost PaCA
cannot avoid, for scale) and four ways to get the (out, r) float32 gradient.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (4096, 1024), "gate/up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def time_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def candidates(g: torch.Tensor, x_sel: torch.Tensor, weight: torch.Tensor) -> dict:
    return {
        "dx_reference (g @ W)": lambda: g @ weight,
        "mm(g^T, x_sel, out_dtype=fp32)": lambda: torch.mm(g.t(), x_sel, out_dtype=torch.float32),
        "mm(x_sel^T, g, out_dtype=fp32)^T": lambda: torch.mm(x_sel.t(), g, out_dtype=torch.float32).t(),
        "(g^T @ x_sel).float()": lambda: (g.t() @ x_sel).float(),
        "(x_sel^T @ g).float()^T": lambda: (x_sel.t() @ g).float().t(),
        "g.float()^T @ x_sel.float()": lambda: g.float().t() @ x_sel.float(),
    }


def main() -> None:
    tokens, r = 2048, 16
    results = {}
    for name, (in_features, out_features) in SHAPES.items():
        g = torch.randn(tokens, out_features, device="cuda", dtype=torch.bfloat16)
        x_sel = torch.randn(tokens, r, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        variants = candidates(g, x_sel, weight)
        results[name] = {label: round(time_ms(fn), 4) for label, fn in variants.items()}
        print(name, results[name], flush=True)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "paca_grad_gemm.json")
    out.write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "tokens": tokens,
                "r": r,
                "ms": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
