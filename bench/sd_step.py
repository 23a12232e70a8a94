"""One SD 1.5 UNet training step: the frozen floor vs diffusers + HF PEFT LoRA vs our LoRA, PaCA and PLP.

    python bench/sd_step.py                                # GPU: every eager variant -> bench/results/sd_step.json
    python bench/sd_step.py --compile-only --append        # GPU: the torch.compile variants, added to that file
    python bench/sd_step.py --tiny                         # CPU smoke test (tiny UNet, batch 2, 2 steps) -> /tmp

What one step is: a UNet2DConditionModel with SD 1.5's config (bench/_sd.py) and random weights, bf16
(fp32 on CPU), takes random 64x64 latents noised at random timesteps by SD 1.5's schedule and random
text states (batch, 77, 768); loss = MSE between the predicted and the true noise (epsilon
prediction); backward; AdamW (fused on CUDA, lr 1e-4) on the trainable parameters. SDPA attention,
no gradient checkpointing. Every variant gets a freshly built UNet from the same seed and the same
batch; the adapters target to_q, to_k, to_v and to_out.0 of every attention block (128 layers).

Variants:
- frozen: the UNet frozen, requires_grad only on the noisy latents, so backward computes dX through
  every layer and no weight gradient; no optimizer. The floor an adapter can approach.
- peft_lora: what users run today, diffusers' train_text_to_image_lora.py: `unet.add_adapter(
  peft.LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=...))` on the
  bf16 UNet (so its LoRA weights are bf16, as in that script for bf16 mixed precision).
- lora: peft_core LoRA r=16, alpha=16 (float32 adapter weights, bf16 math).
- paca: peft_core PaCA r=32, alpha=32: parameter-matched to LoRA r=16 on the square layers, same
  scale alpha/r = 1; resident columns, `handle.track_optimizer(optimizer)`.
- plp: peft_core PLP at the Break-for-Make spec's rank 64 (shared/specs/break_for_make.md): half
  of each factor trainable, so it trains as many parameters as a LoRA of rank 32.
- <variant>_compiled (--compile / --compile-only): the same after `torch.compile`, of the whole UNet
  (--compile-scope unet) or of its 16 BasicTransformerBlocks (--compile-scope blocks, diffusers'
  "regional compilation": the blocks hold every adapted layer and compile in a fraction of the
  time). Kept only if the compiling call (forward + backward, before any optimizer step) gives the
  eager loss and the eager gradients of the same model within bf16 tolerance (loss 1e-2 relative,
  gradients 5e-2 relative L2); a failure to compile or a mismatch is recorded as {"error": ...}.
  Gradients, not only the loss: on the CPU, inductor compiling the whole tiny UNet gives the eager
  loss but wrong dX (relative error ~0.7), even with no adapter at all.
- <variant>_graphed (--graphed / --graphed-only, CUDA only): the step captured whole (forward,
  backward, capturable fused AdamW) in one CUDA graph and replayed: no host work per step at all.
  For lora/paca/plp this is `pipelines.cuda_graphs.GraphedTrainStep`, the step `studio train-*`
  runs on one CUDA GPU by default (`cuda_graph="auto"`); frozen and peft_lora use the bench's own
  `_common.capture_step`. Their peak memory counts from before the capture, so it includes the
  graph's pool. "criteria_graphed" compares graphed with graphed; "criteria_trainer" compares what
  each tool runs by default: ours graphed vs peft_lora eager (diffusers' script), against the lower
  of the two floors.

Measured per variant: median ms/step over --steps timed steps after --warmup untimed ones (each
synchronized), images/s = batch / step time, peak allocated GPU memory over the timed steps, the first
step's time (compile, cuDNN autotuning) and its loss. "ratios" and "criteria" evaluate issue 11's
targets (PaCA <= 0.60x peft_lora and <= 1.15x frozen; lora <= 0.80x peft_lora; plp <= 1.05x lora;
peak memory of ours <= peft_lora's) on the eager numbers, and "criteria_compiled" on the compiled ones
where they exist. The JSON is rewritten after every variant, so an interrupted run keeps what it has.
"""

from __future__ import annotations

import os

# Set before torch initialises CUDA: fewer fragmentation spikes in peak memory.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (
    MemoryTrace,
    allocated_gib,
    capture_step,
    device_dtype_out,
    format_table,
    free_memory,
    log,
    package_versions,
    parse_variants,
    ratio,
    repo_on_path,
    sync,
    time_steps,
    write_json,
)
from _sd import SCHEDULER_CONFIG, UNET_CONFIGS, UNET_TARGETS, random_unet  # noqa: E402

repo_on_path()

from peft_core import LoraConfig, PacaConfig, PlpConfig, attach  # noqa: E402
from pipelines.cuda_graphs import GraphedTrainStep, StepInputs  # noqa: E402

EAGER_VARIANTS = ["frozen", "peft_lora", "lora", "paca", "plp"]
# Compiled variants in the order worth their compile time: ours first, then the baselines.
COMPILED_VARIANTS = ["lora_compiled", "paca_compiled", "peft_lora_compiled", "frozen_compiled", "plp_compiled"]
GRAPHED_VARIANTS = ["frozen_graphed", "peft_lora_graphed", "lora_graphed", "paca_graphed", "plp_graphed"]
VARIANTS = EAGER_VARIANTS + COMPILED_VARIANTS + GRAPHED_VARIANTS

LORA_R, LORA_ALPHA = 16, 16
PACA_R, PACA_ALPHA = 32, 32  # parameter-matched to LoRA r=16 on square layers; same scale alpha/r = 1
PLP_R = 64  # the Break-for-Make spec's rank (its code trains SDXL at rank 64)
TIMING_LR = 1e-4
TEXT_TOKENS = 77


# ---------------------------------------------------------------------------------------------
# Batch, variants, one training step.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    noisy: torch.Tensor  # (B, 4, 64, 64) latents noised at `timesteps`
    timesteps: torch.Tensor  # (B,)
    text: torch.Tensor  # (B, 77, cross_attention_dim)
    noise: torch.Tensor  # (B, 4, 64, 64): the epsilon target


def random_batch(config_name: str, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> Batch:
    """Random latents noised by SD 1.5's schedule (DDPM forward process), random text states."""
    from diffusers import DDPMScheduler

    config = UNET_CONFIGS[config_name]
    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, config["in_channels"], config["sample_size"], config["sample_size"])
    latents = torch.randn(shape, device=device, generator=generator)
    noise = torch.randn(shape, device=device, generator=generator)
    timesteps = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (batch,), device=device, generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    text = torch.randn((batch, TEXT_TOKENS, config["cross_attention_dim"]), device=device, generator=generator)
    return Batch(noisy.to(dtype), timesteps, text.to(dtype), noise.to(dtype))


@dataclasses.dataclass
class Prepared:
    unet: torch.nn.Module
    params: list[torch.nn.Parameter]
    handle: Any = None  # peft_core handle (PaCA's track_optimizer)
    frozen: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def prepare_variant(method: str, unet: torch.nn.Module, seed: int) -> Prepared:
    """Freeze the UNet and add `method`'s adapter; adapter init is seeded so eager and compiled match."""
    unet.requires_grad_(False)
    torch.manual_seed(seed + 1)
    if method == "frozen":
        return Prepared(unet, [], frozen=True, info={"grad_to": "noisy latents only"})
    if method == "peft_lora":
        import peft

        # Exactly diffusers' examples/text_to_image/train_text_to_image_lora.py.
        config = peft.LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=list(UNET_TARGETS)
        )
        unet.add_adapter(config)
        params = [p for p in unet.parameters() if p.requires_grad]
        summary = {k: getattr(config, k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "init_lora_weights")}
        return Prepared(unet, params, info={"config": {**summary, "target_modules": sorted(config.target_modules)}})
    if method == "lora":
        config = LoraConfig(targets=list(UNET_TARGETS), r=LORA_R, alpha=LORA_ALPHA)
    elif method == "paca":
        config = PacaConfig(targets=list(UNET_TARGETS), r=PACA_R, alpha=PACA_ALPHA)
    elif method == "plp":
        config = PlpConfig(targets=list(UNET_TARGETS), r=PLP_R)
    else:
        raise ValueError(f"unknown method {method!r}")
    handle = attach(unet, config)
    return Prepared(unet, handle.trainable_parameters(), handle=handle, info={"config": config.to_dict()})


def make_train_step(unet: torch.nn.Module, optimizer, batch: Batch, frozen: bool) -> Callable[[], torch.Tensor]:
    """step() -> detached loss: zero_grad, forward, epsilon-MSE, backward, optimizer step."""

    def step() -> torch.Tensor:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        # The floor: a fresh leaf each step, so backward runs dX through every layer.
        noisy = batch.noisy.detach().requires_grad_(True) if frozen else batch.noisy
        prediction = unet(noisy, batch.timesteps, encoder_hidden_states=batch.text).sample
        loss = F.mse_loss(prediction.float(), batch.noise.float())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    return step


def forward_backward(prepared: Prepared, batch: Batch) -> tuple[float, list[torch.Tensor]]:
    """One forward + backward, no optimizer step: (loss, the gradients it produced), grads then cleared.

    The gradients are the trainable parameters' (zeros where autograd gave none) or, for the frozen
    UNet, the noisy latents'. This is the reference a compiled model must reproduce: its loss alone
    is not enough (on the CPU, inductor compiling the whole UNet gives the eager loss but wrong dX).
    """
    noisy = batch.noisy.detach().requires_grad_(True) if prepared.frozen else batch.noisy
    prediction = prepared.unet(noisy, batch.timesteps, encoder_hidden_states=batch.text).sample
    loss = F.mse_loss(prediction.float(), batch.noise.float())
    loss.backward()
    if prepared.frozen:
        grads = [noisy.grad.float().clone()]
    else:
        grads = [
            torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float().clone()
            for p in prepared.params
        ]
        for parameter in prepared.params:
            parameter.grad = None
    return float(loss.detach()), grads


def compare_grads(compiled: list[torch.Tensor], eager: list[torch.Tensor]) -> dict[str, float]:
    """Relative L2 error over all gradients together, and the worst single tensor's (where eager's is nonzero)."""
    difference = torch.cat([(c - e).flatten() for c, e in zip(compiled, eager)]).double().norm()
    reference = torch.cat([e.flatten() for e in eager]).double().norm()
    worst = max(
        (float((c - e).double().norm() / e.double().norm()) for c, e in zip(compiled, eager) if e.norm() > 0),
        default=0.0,
    )
    return {
        "grad_rel_l2": float(difference / reference.clamp_min(1e-30)),
        "grad_worst_tensor_rel_l2": worst,
        "grad_norm_eager": float(reference),
    }


def compile_unet(unet: torch.nn.Module, scope: str) -> int:
    """torch.compile in place: the whole UNet, or each BasicTransformerBlock; returns the number compiled."""
    if scope == "unet":
        unet.compile()
        return 1
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block.compile()
    return len(blocks)


def reset_dynamo() -> None:
    """A fresh compile cache per variant: the previous UNet is released, no variant inherits another's
    recompile budget, and the counters count this variant only."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def dynamo_summary() -> dict[str, Any]:
    """What dynamo did for this variant: graphs (one per compiled region and shape means no Python
    left inside), graph breaks and their first reasons, and every other counter's total."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {
        "unique_graphs": counters.get("stats", {}).get("unique_graphs"),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": [str(reason)[:300] for reason, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]],
        "resume_functions": sum(counters.get("resumes", {}).values()),  # one per graph break dynamo resumed after
        "counters": {key: sum(values.values()) for key, values in counters.items() if values},
    }


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(loss rtol, gradient rel-L2 tol) for compiled vs eager: bf16 kernels fused in another order move
    the mean loss by ~1e-3 and gradients by ~1e-2; an actual miscompile moves gradients by O(1)."""
    return (1e-2, 5e-2) if dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-3)


def run_variant(name: str, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    method = name.removesuffix("_compiled").removesuffix("_graphed")
    compiled, graphed = name.endswith("_compiled"), name.endswith("_graphed")
    if graphed and device.type != "cuda":
        return {"error": "CUDA graphs need a CUDA device"}
    start = time.perf_counter()
    log(f"[{name}] building the {args.config} UNet on {device} ({dtype})")
    unet = random_unet(args.config, device, dtype, args.seed)
    prepared = prepare_variant(method, unet, args.seed)
    batch = random_batch(args.config, args.batch, device, dtype, args.seed + 2)
    reference = None
    if compiled:
        reference = forward_backward(prepared, batch)  # eager, on this very model, before compiling
        regions = compile_unet(prepared.unet, args.compile_scope)
    optimizer = (
        torch.optim.AdamW(prepared.params, lr=TIMING_LR, fused=device.type == "cuda", capturable=graphed)
        if prepared.params
        else None
    )
    if method == "paca" and optimizer is not None:
        prepared.handle.track_optimizer(optimizer)
    step = make_train_step(prepared.unet, optimizer, batch, prepared.frozen)
    if graphed:
        torch.cuda.reset_peak_memory_stats(device)  # the capture allocates the graph's pool: count it
        if prepared.handle is not None:  # ours: the trainer's own graphed step
            trainer_step = GraphedTrainStep(
                prepared.unet,
                optimizer,
                prepared.params,
                max_grad_norm=0.0,
                after_replay=lambda: prepared.handle.after_optimizer_step(refresh=False),
            )
            inputs = StepInputs(
                {"sample": batch.noisy, "timestep": batch.timesteps, "encoder_hidden_states": batch.text}, batch.noise
            )
            step = lambda: trainer_step(inputs).clone()  # noqa: E731
            for _ in range(trainer_step.warmup + 1):  # eager warm-ups, then capture + first replay
                step()
        else:
            step = capture_step(step)  # warm-up steps + capture; from here on each step is one replay
    sync(device)
    build_s = time.perf_counter() - start
    weights_gib = allocated_gib(device)
    trainable = sum(p.numel() for p in prepared.params)
    log(f"[{name}] built in {build_s:.1f}s; {trainable:,} trainable params; first step (compile/autotune) ...")

    result: dict[str, Any] = {}
    first_start = time.perf_counter()
    if compiled:
        # The compiling call: forward + backward only, checked against eager before any optimizer step.
        compiled_loss, compiled_grads = forward_backward(prepared, batch)
        sync(device)
        first_step_s = time.perf_counter() - first_start
        loss_rtol, grad_rtol = tolerances(dtype)
        eager_loss, eager_grads = reference
        loss_rel = abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12)
        result["compile"] = {
            "scope": args.compile_scope,
            "regions": regions,
            "first_step_s": round(first_step_s, 2),
            "eager_loss": eager_loss,
            "compiled_loss": compiled_loss,
            "loss_rel_diff": loss_rel,
            **compare_grads(compiled_grads, eager_grads),
            "tolerances": {"loss_rel": loss_rtol, "grad_rel_l2": grad_rtol},
        }
        del reference, eager_grads, compiled_grads
        check = result["compile"]
        if not (loss_rel <= loss_rtol and check["grad_rel_l2"] <= grad_rtol):
            log(
                f"[{name}] compiled != eager: loss {compiled_loss:.6f} vs {eager_loss:.6f} (rel {loss_rel:.2e}), "
                f"gradients rel L2 {check['grad_rel_l2']:.2e}"
            )
            return {
                "error": f"compiled differs from eager: loss rel {loss_rel:.3g} (tol {loss_rtol}), "
                f"gradients rel L2 {check['grad_rel_l2']:.3g} (tol {grad_rtol})",
                **result,
                **dynamo_summary(),
            }
        first_loss = compiled_loss
    else:
        first_loss = float(step())
        sync(device)
        first_step_s = time.perf_counter() - first_start
    log(
        f"[{name}] first step {first_step_s:.1f}s, loss {first_loss:.5f}; {args.warmup} warm-up + "
        f"{args.steps} timed steps"
    )

    timing = time_steps(step, device, args.warmup, args.steps, reset_peak=not graphed)
    last_loss = float(timing["last"])
    ms = timing["ms_per_step"]
    result.update(
        {
            "ms_per_step": round(ms, 3),
            "peak_gib": None if timing["peak_gib"] is None else round(timing["peak_gib"], 3),
            "images_per_s": round(args.batch * 1e3 / ms, 2),
            "ms_min": round(timing["ms_min"], 3),
            "ms_mean": round(timing["ms_mean"], 3),
            "ms_all": timing["ms_all"],
            "first_step_s": round(first_step_s, 2),
            "trainable_params": trainable,
            "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in prepared.params}),
            "weights_gib": None if weights_gib is None else round(weights_gib, 3),  # allocated before step 1
            "loss_first": first_loss,
            "loss_last": last_loss,
            "finite": math.isfinite(first_loss) and math.isfinite(last_loss),
            "build_s": round(build_s, 2),
            "wall_s": round(time.perf_counter() - start, 2),
            **prepared.info,
        }
    )
    if compiled:
        result["compile"].update(dynamo_summary())
    log(
        f"[{name}] {ms:.1f} ms/step (min {timing['ms_min']:.1f}), {result['images_per_s']} img/s, "
        f"peak {result['peak_gib'] if result['peak_gib'] is not None else '-'} GiB, loss "
        f"{first_loss:.4f} -> {last_loss:.4f}"
    )
    return result


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
def _field(results: dict, variant: str, key: str):
    entry = results.get(variant)
    return entry.get(key) if isinstance(entry, dict) else None


def compute_ratios(results: dict, suffix: str = "") -> dict[str, float | None]:
    """Time and memory ratios between variants; suffix "_compiled" compares the compiled variants."""
    t = lambda v: _field(results, v + suffix, "ms_per_step")  # noqa: E731
    m = lambda v: _field(results, v + suffix, "peak_gib")  # noqa: E731
    out = {
        "paca_vs_peft_lora_time": ratio(t("paca"), t("peft_lora")),
        "paca_vs_frozen_time": ratio(t("paca"), t("frozen")),
        "lora_vs_peft_lora_time": ratio(t("lora"), t("peft_lora")),
        "plp_vs_lora_time": ratio(t("plp"), t("lora")),
        "lora_vs_frozen_time": ratio(t("lora"), t("frozen")),
        "plp_vs_frozen_time": ratio(t("plp"), t("frozen")),
        "peft_lora_vs_frozen_time": ratio(t("peft_lora"), t("frozen")),
        "paca_vs_lora_time": ratio(t("paca"), t("lora")),
    }
    for method in ("lora", "paca", "plp"):
        out[f"{method}_vs_peft_lora_memory"] = ratio(m(method), m("peft_lora"))
    return out


# Issue 11's "done when" thresholds (H100, SD 1.5 UNet, batch 8, 512 px).
CRITERIA = (
    ("paca_vs_peft_lora_time", 0.60),
    ("paca_vs_frozen_time", 1.15),
    ("lora_vs_peft_lora_time", 0.80),
    ("plp_vs_lora_time", 1.05),
    ("lora_vs_peft_lora_memory", 1.0),
    ("paca_vs_peft_lora_memory", 1.0),
    ("plp_vs_peft_lora_memory", 1.0),
)


def evaluate_criteria(ratios: dict[str, float | None]) -> dict[str, bool | None]:
    """True/False per target, None where a variant is missing."""
    return {f"{key} <= {bound}": None if ratios.get(key) is None else ratios[key] <= bound for key, bound in CRITERIA}


def trainer_ratios(results: dict) -> dict[str, float | None]:
    """What each tool runs by default: ours graphed (studio's trainer on one CUDA GPU) vs peft_lora
    eager (diffusers' LoRA script), against the lower (stricter) of the eager and graphed floors."""
    t = lambda v: _field(results, v, "ms_per_step")  # noqa: E731
    m = lambda v: _field(results, v, "peak_gib")  # noqa: E731
    floors = [x for x in (t("frozen"), t("frozen_graphed")) if x is not None]
    floor = min(floors) if floors else None
    out = {
        "paca_vs_peft_lora_time": ratio(t("paca_graphed"), t("peft_lora")),
        "paca_vs_frozen_time": ratio(t("paca_graphed"), floor),
        "lora_vs_peft_lora_time": ratio(t("lora_graphed"), t("peft_lora")),
        "plp_vs_lora_time": ratio(t("plp_graphed"), t("lora_graphed")),
    }
    for method in ("lora", "paca", "plp"):
        out[f"{method}_vs_peft_lora_memory"] = ratio(m(f"{method}_graphed"), m("peft_lora"))
    return out


def update_report(report: dict) -> None:
    results = report["results"]
    report["ratios"] = compute_ratios(results)
    report["criteria"] = evaluate_criteria(report["ratios"])
    if any(_field(results, f"{m}_graphed", "ms_per_step") for m in ("lora", "paca", "plp")):
        report["ratios_trainer"] = trainer_ratios(results)
        report["criteria_trainer"] = evaluate_criteria(report["ratios_trainer"])
    for suffix, variants in (("_compiled", COMPILED_VARIANTS), ("_graphed", GRAPHED_VARIANTS)):
        if any(isinstance(results.get(v), dict) and "ms_per_step" in results[v] for v in variants):
            report[f"ratios{suffix}"] = compute_ratios(results, suffix)
            report[f"criteria{suffix}"] = evaluate_criteria(report[f"ratios{suffix}"])


def print_summary(report: dict) -> None:
    results = report["results"]
    frozen_ms, peft_ms, peft_mem = (
        _field(results, "frozen", "ms_per_step"),
        _field(results, "peft_lora", "ms_per_step"),
        _field(results, "peft_lora", "peak_gib"),
    )
    rows = []
    for variant in VARIANTS:
        entry = results.get(variant)
        if variant not in results:
            continue
        if not isinstance(entry, dict) or "ms_per_step" not in entry:
            rows.append([variant, "null" if entry is None else "error", None, None, None, None, None, None])
            continue
        ms = entry["ms_per_step"]
        rows.append(
            [
                variant,
                ms,
                entry["images_per_s"],
                entry["peak_gib"],
                entry["trainable_params"],
                ratio(ms, frozen_ms),
                ratio(ms, peft_ms),
                ratio(entry["peak_gib"], peft_mem),
            ]
        )
    log("")
    log(
        f"{report['model']} UNet on {report['device']}, batch {report['batch']}, {report['dtype']}; "
        f"torch {report['torch']}, diffusers {report['diffusers']}, peft {report['peft']}"
    )
    log(
        format_table(
            ["variant", "ms/step", "img/s", "peak GiB", "trainable", "t/frozen", "t/peft_lora", "mem/peft_lora"], rows
        )
    )
    for key in ("criteria", "criteria_compiled", "criteria_graphed", "criteria_trainer"):
        for criterion, passed in report.get(key, {}).items():
            value = report["ratios" + key.removeprefix("criteria")].get(criterion.split()[0])
            log(f"{key} {criterion}: {'-' if passed is None else ('PASS' if passed else 'FAIL')} ({value})")


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="sd15")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke test: tiny UNet, batch 2, 2 timed steps after 1 warm-up, fp32, output to /tmp",
    )
    parser.add_argument("--batch", type=int, default=None, help="default 8 (--tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant; default 10 (--tiny: 2)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per variant after the first; default 3 (--tiny: 1)"
    )
    parser.add_argument(
        "--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default: the eager ones)"
    )
    parser.add_argument("--compile", action="store_true", help="also run the compiled variants after the eager ones")
    parser.add_argument("--compile-only", action="store_true", help="run only the compiled variants")
    parser.add_argument("--graphed-only", action="store_true", help="run only the CUDA-graph variants")
    parser.add_argument(
        "--compile-scope",
        choices=["unet", "blocks"],
        default="unet",
        help="torch.compile the whole UNet, or each BasicTransformerBlock (faster to compile)",
    )
    parser.add_argument(
        "--append", action="store_true", help="add to --out's existing results instead of starting a new file"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="default bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-trace",
        action="store_true",
        help="CUDA: record the allocator's history per variant and report what is alive at the peak, "
        "by allocation site (results[variant]['memory_at_peak']); slows allocations, so "
        "its timings are not comparable",
    )
    parser.add_argument(
        "--out", default=None, help="default bench/results/sd_step.json on CUDA, /tmp/sd_step_<config>.json otherwise"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.config = "tiny"
    defaults = (2, 2, 1) if args.tiny else (8, 10, 3)
    args.batch, args.steps, args.warmup = (
        default if value is None else value for value, default in zip((args.batch, args.steps, args.warmup), defaults)
    )
    if args.variants:
        args.variants = parse_variants(parser, args.variants, VARIANTS)
    elif args.compile_only:
        args.variants = list(COMPILED_VARIANTS)
    elif args.graphed_only:
        args.variants = list(GRAPHED_VARIANTS)
    else:
        args.variants = EAGER_VARIANTS + (COMPILED_VARIANTS if args.compile else [])
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype, out = device_dtype_out(args, "sd_step")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to(dtype)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "model": "sd15-unet" if args.config == "sd15" else f"{args.config}-unet",
        "batch": args.batch,
        "results": {},
    }
    if args.append and out.is_file():
        previous = json.loads(out.read_text(encoding="utf-8"))
        if previous.get("device") != report["device"] or previous.get("batch") != args.batch:
            log(
                f"warning: appending {report['device']} batch {args.batch} to a file from "
                f"{previous.get('device')} batch {previous.get('batch')}"
            )
        report = previous
    else:
        report["results"] = {v: None for v in EAGER_VARIANTS}
    config = UNET_CONFIGS[args.config]
    report.update(
        {
            "dtype": str(dtype).replace("torch.", ""),
            "resolution_px": config["sample_size"] * 8,
            "latent_size": config["sample_size"],
            "steps": args.steps,
            "warmup": args.warmup,
            "targets": UNET_TARGETS,
            "unet_config": config,
            "optimizer": f"torch.optim.AdamW(lr={TIMING_LR}, fused={device.type == 'cuda'})",
            "loss": "MSE(unet(noisy, t, text).sample, noise), epsilon prediction, SD 1.5 noise schedule",
            **package_versions("diffusers", "peft"),
            "cuda": torch.version.cuda,
            "notes": {
                "frozen": "UNet frozen; requires_grad only on the noisy latents; no optimizer step",
                "peft_lora": "diffusers unet.add_adapter(peft.LoraConfig(r=16, lora_alpha=16, "
                "init_lora_weights='gaussian')) on the bf16 UNet, as diffusers' train_text_to_image_lora.py does",
                "paca": f"r={PACA_R}, alpha={PACA_ALPHA}: parameter-matched to LoRA r={LORA_R} on square layers",
                "plp": f"r={PLP_R} (Break-for-Make spec), half of each factor trainable",
                "peak_gib": "torch.cuda.max_memory_allocated over the timed steps",
                "compiled": "kept only if the compiling forward + backward gives the eager loss and gradients "
                "(same model, before any optimizer step) within compile.tolerances",
            },
        }
    )
    log(
        f"sd_step: {report['model']} on {report['device']} ({report['dtype']}), batch {args.batch}, torch "
        f"{report['torch']}, diffusers {report['diffusers']}, peft {report['peft']}; variants {args.variants}"
    )

    for name in args.variants:
        if name.endswith("_compiled"):
            reset_dynamo()
        free_memory(device)
        # On file before it runs: a variant killed by a timeout shows as such, not as absent.
        report["results"][name] = {"error": "started but did not finish (killed, e.g. by a timeout)"}
        write_json(out, report)
        try:
            if args.memory_trace and device.type == "cuda":
                with MemoryTrace(device) as trace:
                    report["results"][name] = run_variant(name, args, device, dtype)
                report["results"][name]["memory_at_peak"] = trace.breakdown()
                del trace
            else:
                report["results"][name] = run_variant(name, args, device, dtype)
        except Exception as error:  # noqa: BLE001 - keep the other variants' numbers
            traceback.print_exc()
            report["results"][name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        free_memory(device)
        update_report(report)
        write_json(out, report)

    update_report(report)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(out, report)
    print_summary(report)
    log(f"wrote {out} ({report['wall_s']}s)")
    return report


if __name__ == "__main__":
    main()
