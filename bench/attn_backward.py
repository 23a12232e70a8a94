"""Does an approximate attention backward earn its place? (issue #7's acceptance test)

    python bench/attn_backward.py                 # GPU; writes bench/results/attn_backward.json
    python bench/attn_backward.py --cpu-smoke     # tiny shapes on the CPU; prints, writes nothing

The experimental backwards of `peft_core/analysis/experimental_backward.py` (row-sampled, Nyström)
ship in the public API only if, at some documented shape, one of them has relative gradient error
< 1e-2 against an fp32 reference *and* a backward at least 1.3x faster than the exact SDPA backward
(FlashAttention on an H100) in the same dtype. This script measures exactly that and says so in the
result's "verdict". Queries and keys are scaled to a chosen rho = max|sqrt(beta) q| / sqrt(ln L)
(default 0.4: the low-rank regime, the only one where an approximation is claimed to help).

Timing: one forward builds the graph, then `torch.autograd.grad(..., retain_graph=True)` is timed
repeatedly (backward only). Errors: per gradient and overall relative Frobenius error, cosine
similarity and normalized max-abs error against SDPA's gradients in float32; the exact
low-precision backward's own error is reported as the floor.
The CPU smoke mode checks that everything runs; its timings mean nothing and it never writes a result
file under bench/results/.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from _common import format_table, log, repo_on_path, time_steps, write_json

repo_on_path()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from peft_core.analysis.experimental_backward import approximate_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (batch, heads, length, head_dim, causal)
GPU_SHAPES = {
    "sd15-512px-self (L=4096, d=40)": (2, 8, 4096, 40, False),
    "dit-long-self (L=16384, d=64)": (1, 8, 16384, 64, False),
    "llm-8k-causal (L=8192, d=128)": (1, 8, 8192, 128, True),
}
CPU_SHAPES = {"smoke (L=256, d=16)": (1, 2, 256, 16, False), "smoke-causal (L=256, d=16)": (1, 2, 256, 16, True)}
MAX_RELATIVE_ERROR, MIN_SPEEDUP = 1e-2, 1.3


def make_inputs(shape, rho: float, dtype, device, seed: int):
    batch, heads, length, dim, _ = shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, upstream = (torch.randn(batch, heads, length, dim, generator=generator) for _ in range(4))
    gamma = rho * math.sqrt(math.log(length))
    root_beta = dim**-0.25
    q, k = q * gamma / (root_beta * q.abs().max()), k * gamma / (root_beta * k.abs().max())
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, upstream)]


def variants(shape, length: int) -> dict[str, dict]:
    causal = shape[4]
    found = {"exact (SDPA)": {"mode": "exact"}}
    for divisor in (16, 4):
        found[f"row_sampled m=L/{divisor}"] = {"mode": "row_sampled", "samples": max(1, length // divisor)}
    if not causal:
        for landmarks in (32, 64):
            found[f"nystrom m={landmarks}"] = {"mode": "nystrom", "landmarks": landmarks}
    return found


def errors(approx, exact) -> dict[str, float]:
    result = {}
    diff = norm = 0.0
    for name, a, b in zip(("dq", "dk", "dv"), approx, exact):
        a, b = a.double(), b.double()
        result[f"{name}_relative"] = ((a - b).norm() / b.norm()).item()
        diff, norm = diff + ((a - b) ** 2).sum().item(), norm + (b**2).sum().item()
        result[f"{name}_cosine"] = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        result[f"{name}_max_abs_normalized"] = ((a - b).abs().max() / b.abs().max()).item()
    result["relative"] = math.sqrt(diff / norm)
    return result


def bench_shape(name, shape, dtype, device, rho, warmup, steps, seed):
    causal = shape[4]
    q, k, v, upstream = make_inputs(shape, rho, dtype, device, seed)
    leaves32 = [t.float().requires_grad_(True) for t in (q, k, v)]
    out32 = F.scaled_dot_product_attention(*leaves32, is_causal=causal)
    reference = torch.autograd.grad(out32, leaves32, upstream.float())
    del out32, leaves32
    rows = {}
    for label, options in variants(shape, shape[2]).items():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        try:
            out = approximate_attention(*leaves, causal=causal, **options)

            def backward(out=out, leaves=leaves):
                return torch.autograd.grad(out, leaves, upstream, retain_graph=True)

            timing = time_steps(backward, device, warmup=warmup, steps=steps)
            rows[label] = {
                "backward_ms": timing["ms_per_step"],
                "backward_ms_all": timing["ms_all"],
                "peak_gib": timing["peak_gib"],
                **errors(timing["last"], reference),
            }
        except torch.OutOfMemoryError as error:
            rows[label] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        del leaves
        if device == "cuda":
            torch.cuda.empty_cache()
    exact_ms = rows["exact (SDPA)"].get("backward_ms")
    for row in rows.values():
        if "backward_ms" in row and exact_ms:
            row["speedup"] = exact_ms / row["backward_ms"]
            row["passes"] = row["relative"] < MAX_RELATIVE_ERROR and row["speedup"] >= MIN_SPEEDUP
    log(f"\n{name}: batch, heads, L, d, causal = {shape}; rho = {rho}")
    log(
        format_table(
            ["variant", "bwd ms", "speedup", "rel err", "cos dq", "max-abs dq"],
            [
                [
                    label,
                    row.get("backward_ms"),
                    row.get("speedup"),
                    row.get("relative"),
                    row.get("dq_cosine"),
                    row.get("dq_max_abs_normalized"),
                ]
                for label, row in rows.items()
            ],
        )
    )
    return {"shape": dict(zip(("batch", "heads", "length", "head_dim", "causal"), shape)), "rho": rho, "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU; prints only")
    parser.add_argument(
        "--rho", type=float, default=0.4, help="max |sqrt(beta) q| / sqrt(ln L) of the inputs (default 0.4)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="default bfloat16 on CUDA, float32 on the CPU",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="result JSON (GPU default: bench/results/attn_backward.json)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, shapes = "cpu", CPU_SHAPES
        if args.out and Path(args.out).resolve().is_relative_to(RESULTS):
            sys.exit("--cpu-smoke never writes under bench/results/: its timings are not the benchmark")
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device; this benchmark is a GPU measurement (use --cpu-smoke to check it runs)")
        device, shapes = "cuda", GPU_SHAPES
        args.out = args.out or str(RESULTS / "attn_backward.json")
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    results = {
        name: bench_shape(name, shape, dtype, device, args.rho, args.warmup, args.steps, args.seed)
        for name, shape in shapes.items()
    }
    winners = [
        f"{shape}: {label}"
        for shape, result in results.items()
        for label, row in result["variants"].items()
        if row.get("passes") and not label.startswith("exact")
    ]
    verdict = (
        f"ships: {winners}"
        if winners
        else f"stays out of the public API: no approximate backward reached relative error < {MAX_RELATIVE_ERROR} "
        f"with >= {MIN_SPEEDUP}x backward speed-up at these shapes"
    )
    log(f"\nverdict: {verdict}")
    if args.out:
        write_json(
            args.out,
            {
                "bench": "attn_backward",
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__,
                "dtype": str(dtype),
                "cpu_smoke": args.cpu_smoke,
                "acceptance": {"max_relative_error": MAX_RELATIVE_ERROR, "min_speedup": MIN_SPEEDUP},
                "results": results,
                "verdict": verdict,
                "passing": winners,
            },
        )
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
