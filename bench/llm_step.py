"""One training step of a Llama causal LM: the frozen floor vs HF PEFT LoRA vs our LoRA and PaCA.

    python bench/llm_step.py                                   # GPU: Llama-3-8B shapes, seq 2048
    python bench/llm_step.py --config tiny --steps 2 --warmup 1 --no-max-seq   # CPU smoke test

Each variant gets a freshly built `LlamaForCausalLM` (random bf16 weights, std 0.02, the same
seed for every variant, SDPA attention, no gradient checkpointing, no KV cache) and runs
forward + backward + AdamW (fused on CUDA) on its trainable parameters, loss = causal-LM loss
on random token labels. All seven projections (q, k, v, o, gate, up, down) are targeted.

Variants:
- frozen: every weight frozen; the input embeddings are fed as `inputs_embeds` with
  requires_grad=True, so backward computes dX through every layer and no weight gradient.
  This is the floor an adapter can approach (no optimizer step: nothing is trainable).
- peft_lora: HF peft LoRA r=8, lora_alpha=16, dropout 0, via get_peft_model (peft defaults:
  adapter weights upcast to float32).
- lora: peft_core LoRA r=8, alpha=16.
- paca: peft_core PaCA r=16 (parameter-matched to LoRA r=8), alpha=32, resident columns,
  `handle.track_optimizer(opt)`.
- peft_paca: HF peft's own PaCA (r=16) if the installed peft has `PacaConfig`, else null.
- <variant>_graphed (frozen_graphed, peft_lora_graphed, lora_graphed, paca_graphed): the same
  step captured once as a whole in a CUDA graph (PyTorch's whole-network capture recipe: warm-up
  on a side stream, capturable fused AdamW) and replayed. This is what a static-shape trainer can
  do; it removes the CPU's launch cost and jitter from every variant alike, so the graphed
  variants are compared with frozen_graphed / peft_lora_graphed only.

Per variant: median ms/step over the timed steps (after warm-up), peak allocated GPU memory
during the timed steps, and for the adapter variants the longest sequence that fits one step
at batch 1 (doubling, then bisection on multiples of --max-seq-step). Before the timings it
runs correctness checks on a tiny Llama on the same device and dtype. Results go to --out as
JSON (written after every variant, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import os

# Set before torch initialises CUDA: fewer fragmentation OOMs in the max-seq search.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from _common import (
    GIB,
    REPO_ROOT,
    StepPhases,
    allocated_gib,
    capture_step,
    format_table,
    free_memory,
    log,
    max_fitting,
    package_versions,
    parse_variants,
    random_llama,
    ratio,
    repo_on_path,
    sync,
    time_steps,
    try_step,
    write_json,
)

repo_on_path()

import peft_core.layer as peft_core_layer  # noqa: E402
from peft_core import LoraConfig, PacaConfig, attach  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["frozen", "peft_lora", "lora", "paca", "peft_paca"]
GRAPHED = ["frozen_graphed", "peft_lora_graphed", "lora_graphed", "paca_graphed"]
# Ablations, run only when named: PaCA with its resident columns rewritten lazily in the next forward
# instead of right after the optimizer step (peft_core's choice; see PacaAdapter.after_optimizer_step).
EXTRA = ["paca_lazy_refresh"]
MAX_SEQ_VARIANTS = ("peft_lora", "lora", "paca", "peft_paca")

LORA_R, LORA_ALPHA = 8, 16
PACA_R, PACA_ALPHA = 16, 32  # parameter-matched to LoRA r=8, same scale s = alpha / r = 2
TIMING_LR = 1e-4

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}


# ---------------------------------------------------------------------------------------------
# Model, batches, one training step.
# ---------------------------------------------------------------------------------------------
def build_model(config_name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A LlamaForCausalLM of config `config_name` on `device` in `dtype`, weights ~ N(0, 0.02), norms 1."""
    return random_llama(MODEL_CONFIGS[config_name], device, dtype, seed)


def random_batch(
    vocab: int, batch: int, seq: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=generator)
    labels = torch.randint(0, vocab, (batch, seq), device=device, generator=generator)
    return ids, labels


SDPA_BACKENDS = ("default", "flash", "cudnn", "efficient", "math")


def attention_backend(name: str):
    """A context that pins scaled_dot_product_attention to one backend ("default": PyTorch's choice)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel(backend)


def make_train_step(
    model,
    optimizer,
    frozen: bool,
    autocast: bool,
    device: torch.device,
    sdpa_backend: str = "default",
    phases: StepPhases | None = None,
) -> Callable:
    """step(ids, labels) -> detached loss: zero_grad, forward, backward, optimizer step.

    With `phases`, each phase's host and GPU time is recorded (bench/_common.StepPhases)."""
    embed = model.get_input_embeddings()
    mark = phases.mark if phases is not None else (lambda phase: None)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if phases is not None:
            phases.begin()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), attention_backend(sdpa_backend):
            if frozen:
                inputs_embeds = embed(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=inputs_embeds, labels=labels, use_cache=False).loss
            else:
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        mark("forward")
        loss.backward()
        mark("backward")
        if optimizer is not None:
            optimizer.step()
        mark("optimizer")
        if phases is not None:
            phases.end()
        return loss.detach()

    return step


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device, capturable: bool = False):
    if not params:
        return None
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda", capturable=capturable)


# ---------------------------------------------------------------------------------------------
# Variants.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    model: Any  # what gets called (the PeftModel for peft variants)
    params: list[torch.nn.Parameter]
    handle: Any = None  # peft_core handle (track_optimizer for PaCA)
    frozen: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def peft_has_paca() -> bool:
    try:
        import peft
    except ImportError:
        return False
    return hasattr(peft, "PacaConfig")


def peft_paca_config():
    import peft

    fields = {f.name for f in dataclasses.fields(peft.PacaConfig)}
    kwargs: dict[str, Any] = {"r": PACA_R, "target_modules": list(TARGETS), "task_type": "CAUSAL_LM"}
    for alpha_name in ("paca_alpha", "alpha", "lora_alpha"):
        if alpha_name in fields:
            kwargs[alpha_name] = PACA_ALPHA
            break
    return peft.PacaConfig(**kwargs)


def prepare_variant(name: str, model) -> Prepared:
    if name == "frozen":
        model.requires_grad_(False)
        return Prepared(model, [], frozen=True, info={"grad_to": "inputs_embeds only"})
    if name in ("peft_lora", "peft_paca"):
        import peft

        if name == "peft_paca":
            config = peft_paca_config()
        else:
            config = peft.LoraConfig(
                r=LORA_R,
                lora_alpha=LORA_ALPHA,
                lora_dropout=0.0,
                target_modules=list(TARGETS),
                task_type="CAUSAL_LM",
            )
        peft_model = peft.get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        keys = (
            "peft_type",
            "r",
            "lora_alpha",
            "paca_alpha",
            "alpha",
            "lora_dropout",
            "target_modules",
            "bias",
        )
        summary = {k: getattr(config, k) for k in keys if hasattr(config, k)}
        return Prepared(peft_model, params, info={"config": summary})
    if name == "lora":
        config = LoraConfig(targets=list(TARGETS), r=LORA_R, alpha=LORA_ALPHA)
    elif name in ("paca", "paca_lazy_refresh"):
        config = PacaConfig(targets=list(TARGETS), r=PACA_R, alpha=PACA_ALPHA)
    else:
        raise ValueError(f"unknown variant {name!r}")
    handle = attach(model, config)
    return Prepared(model, handle.trainable_parameters(), handle=handle, info={"config": config.to_dict()})


def run_variant(name: str, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    graphed = name.endswith("_graphed")
    if graphed and device.type != "cuda":
        log(f"[{name}] skipped: CUDA graphs need a CUDA device")
        return None
    if name == "peft_paca" and not peft_has_paca():
        import peft

        log(f"[{name}] skipped: peft {peft.__version__} has no PacaConfig")
        return None
    start = time.perf_counter()
    log(f"[{name}] building {args.config} on {device} ({dtype})")
    model = build_model(args.config, device, dtype, args.seed)
    prepared = prepare_variant(name.removesuffix("_graphed"), model)
    optimizer = make_optimizer(prepared.params, TIMING_LR, device, capturable=graphed)
    if name == "paca_lazy_refresh" and optimizer is not None:
        handle = prepared.handle
        optimizer.register_step_post_hook(lambda *_args: handle.after_optimizer_step(refresh=False))
    elif name.startswith("paca") and optimizer is not None:
        prepared.handle.track_optimizer(optimizer)
    step = make_train_step(prepared.model, optimizer, prepared.frozen, args.autocast, device, args.sdpa_backend)
    vocab = MODEL_CONFIGS[args.config]["vocab_size"]
    ids, labels = random_batch(vocab, args.batch, args.seq_len, device, args.seed + 1)
    if graphed:
        captured = capture_step(lambda: step(ids, labels))
        step = lambda ids, labels: captured()  # noqa: E731 - the graph replays its own static batch
    sync(device)
    build_s = time.perf_counter() - start
    base_gib = allocated_gib(device)
    log(
        f"[{name}] built in {build_s:.1f}s; {sum(p.numel() for p in prepared.params):,} trainable params; "
        f"{args.warmup} warm-up + {args.steps} timed steps at batch {args.batch} x seq {args.seq_len}"
    )

    if args.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
    timing = time_steps(lambda: step(ids, labels), device, args.warmup, args.steps)
    first_loss, last_loss = float(timing["first"]), float(timing["last"])
    result: dict[str, Any] = {
        "ms_per_step": round(timing["ms_per_step"], 3),
        "peak_gib": None if timing["peak_gib"] is None else round(timing["peak_gib"], 3),
    }
    log(
        f"[{name}] {result['ms_per_step']:.1f} ms/step (min {timing['ms_min']:.1f}), "
        f"peak {result['peak_gib'] if result['peak_gib'] is not None else '-'} GiB, loss "
        f"{first_loss:.4f} -> {last_loss:.4f}"
    )

    fp32_out_mm = peft_core_layer._FP32_OUT_MM.get(device.type) if name in ("lora", "paca") else None
    if args.diagnose and not graphed:
        phases = StepPhases(device)
        probed = make_train_step(
            prepared.model, optimizer, prepared.frozen, args.autocast, device, args.sdpa_backend, phases
        )
        for _ in range(args.diagnose):
            probed(ids, labels)
        phases.close()
        result["phases"] = phases.summary()
        if device.type == "cuda":
            result["host_syncs"] = find_host_syncs(lambda: step(ids, labels))
        log(f"[{name}] phases (median of {args.diagnose}): {result['phases']['median']}")
    if args.profile and device.type == "cuda":
        result["profile"] = profile_steps(lambda: step(ids, labels), device)
        log(f"[{name}] profile: {result['profile']['summary']}")
    if name in MAX_SEQ_VARIANTS:  # eager variants only: a graph is captured for one shape
        if args.no_max_seq or device.type != "cuda":
            result["max_seq_len"] = None
        else:
            try:
                result.update(search_max_seq(name, step, args, device, vocab))
            except Exception as error:  # noqa: BLE001 - keep this variant's timings
                traceback.print_exc()
                result.update({"max_seq_len": None, "max_seq_error": f"{type(error).__name__}: {error}"[:2000]})
                free_memory(device)
    result.update(
        {
            "ms_min": round(timing["ms_min"], 3),
            "ms_mean": round(timing["ms_mean"], 3),
            "ms_all": timing["ms_all"],
            "trainable_params": sum(p.numel() for p in prepared.params),
            "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in prepared.params}),
            "weights_gib": None if base_gib is None else round(base_gib, 3),  # allocated before step 1
            "loss_first": first_loss,
            "loss_last": last_loss,
            "finite": math.isfinite(first_loss) and math.isfinite(last_loss),
            "build_s": round(build_s, 2),
            # whether peft_core's adapter gradients used the bf16 x bf16 -> fp32 GEMM on this device
            "fp32_out_mm": fp32_out_mm,
            "wall_s": round(time.perf_counter() - start, 2),
            **prepared.info,
        }
    )
    return result


def find_host_syncs(step: Callable[[], Any]) -> list[str]:
    """One step under torch.cuda.set_sync_debug_mode("warn"): every operation that made the host wait
    for the GPU (.item(), device-to-host copies, nonzero, ...), with where it was called from."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f"{w.filename}:{w.lineno}: {str(w.message)[:160]}" for w in caught][:30]


def profile_steps(step: Callable, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Where a step's time goes: GPU kernel time vs wall time (a gap means the CPU cannot keep up)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / steps
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / steps
    top_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "wall_ms_per_step_profiled": round(wall_ms, 2),
        "gpu_busy_ms_per_step": round(gpu_us / 1e3, 2),
        "gpu_ops_per_step": round(kernels),
        "top_gpu": [(e.key[:80], round(e.self_device_time_total / steps / 1e3, 3), e.count // steps) for e in top_gpu],
        "top_cpu": [(e.key[:80], round(e.self_cpu_time_total / steps / 1e3, 3), e.count // steps) for e in top_cpu],
        "summary": (
            f"wall {wall_ms:.1f} ms/step (profiled), GPU busy {gpu_us / 1e3:.1f} ms/step, {kernels:.0f} GPU ops/step"
        ),
    }


def search_max_seq(name: str, step: Callable, args, device: torch.device, vocab: int) -> dict[str, Any]:
    """Longest batch-1 sequence (multiple of --max-seq-step) for which one full training step fits."""
    peaks: dict[int, float] = {}
    seconds: dict[int, float] = {}

    def fits(seq: int) -> bool:
        free_memory(device)
        ids, labels = random_batch(vocab, 1, seq, device, args.seed + seq)
        ok, secs = try_step(step, device, ids, labels)
        seconds[seq] = round(secs, 2)
        if ok and device.type == "cuda":
            peaks[seq] = torch.cuda.max_memory_allocated(device) / GIB
        return ok

    log(f"[{name}] max-seq search (batch 1, step {args.max_seq_step}, cap {args.max_seq_cap})")
    start = time.perf_counter()
    known = args.seq_len if args.batch == 1 else args.max_seq_step
    known = max(args.max_seq_step, known // args.max_seq_step * args.max_seq_step)
    if not fits(known):
        log(f"[{name}] {known} does not fit at batch 1")
        return {"max_seq_len": 0, "max_seq_probes": [[known, False]]}
    search = max_fitting(fits, known, args.max_seq_cap, args.max_seq_step)
    free_memory(device)
    best = search["max"]
    log(f"[{name}] max seq {best} ({len(search['probes'])} probes, {time.perf_counter() - start:.1f}s)")
    return {
        "max_seq_len": best,
        "max_seq_peak_gib": round(peaks[best], 3) if best in peaks else None,
        "max_seq_capped": search["capped"],
        "max_seq_probes": [[seq, ok, seconds.get(seq)] for seq, ok in search["probes"]],
    }


# ---------------------------------------------------------------------------------------------
# Correctness checks (tiny Llama, same device and dtype as the timings).
# ---------------------------------------------------------------------------------------------
CHECK_LR = 1e-2


def _loss_rtol(dtype: torch.dtype) -> float:
    return 5e-3 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _named_trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_paca_modes(device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Resident-columns PaCA and additive PaCA (resident=False) give the same losses and deltas."""
    losses, deltas, logits = {}, {}, {}
    ids, labels = random_batch(MODEL_CONFIGS["tiny"]["vocab_size"], 2, 64, device, seed + 7)
    for resident in (True, False):
        model = build_model("tiny", device, dtype, seed)
        handle = attach(model, PacaConfig(targets=list(TARGETS), r=PACA_R, alpha=PACA_ALPHA, resident=resident))
        optimizer = make_optimizer(handle.trainable_parameters(), CHECK_LR, device)
        handle.track_optimizer(optimizer)
        step = make_train_step(model, optimizer, False, False, device)
        run = [float(step(ids, labels)) for _ in range(2)]
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels, use_cache=False)
        run.append(float(out.loss))
        key = "resident" if resident else "additive"
        losses[key], logits[key] = run, out.logits.float()
        deltas[key] = {n: p.detach().float().clone() for n, p in _named_trainable(model).items()}
        del model, handle, optimizer, step, out
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses["resident"], losses["additive"]))
    delta_err = _rel_err(
        torch.cat([t.flatten() for t in deltas["resident"].values()]),
        torch.cat([t.flatten() for t in deltas["additive"].values()]),
    )
    logits_err = _rel_err(logits["resident"], logits["additive"])
    delta_moved = float(torch.cat([t.flatten() for t in deltas["additive"].values()]).abs().max())
    rtol = _loss_rtol(dtype)
    delta_tol = 0.1 if rtol > 1e-3 else 1e-3
    return {
        "what": (
            "PaCA resident vs additive (resident=False): losses of 2 AdamW steps + 1 eval forward, deltas after 2 steps"
        ),
        "losses_resident": losses["resident"],
        "losses_additive": losses["additive"],
        "max_loss_rel_diff": loss_diff,
        "delta_rel_l2_err": delta_err,
        "delta_max_abs": delta_moved,
        "logits_rel_l2_err": logits_err,
        "tolerances": {"loss_rel": rtol, "delta_rel_l2": delta_tol},
        "passed": bool(loss_diff <= rtol and delta_err <= delta_tol and delta_moved > 0),
    }


def check_lora_vs_peft(device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Our LoRA and peft's LoRA, same base weights and same lora_A: same loss at init and after one step."""
    try:
        import peft
    except ImportError as error:
        return {"skipped": f"peft not importable ({error})"}
    ids, labels = random_batch(MODEL_CONFIGS["tiny"]["vocab_size"], 2, 64, device, seed + 11)

    peft_base = build_model("tiny", device, dtype, seed)
    peft_model = peft.get_peft_model(
        peft_base,
        peft.LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            task_type="CAUSAL_LM",
        ),
    )
    ours = build_model("tiny", device, dtype, seed)
    handle = attach(ours, LoraConfig(targets=list(TARGETS), r=LORA_R, alpha=LORA_ALPHA))
    copied = 0
    with torch.no_grad():
        for module_name, wrapper in handle.wrappers():
            peft_layer = peft_base.get_submodule(module_name)
            adapter = wrapper.adapters["default"]
            adapter.lora_A.copy_(peft_layer.lora_A["default"].weight.float())
            if peft_layer.lora_B["default"].weight.abs().max() != 0:
                raise AssertionError(f"peft lora_B of {module_name} is not zero at init")
            copied += 1

    results = {}
    for key, model, params in (
        ("peft", peft_model, [p for p in peft_model.parameters() if p.requires_grad]),
        ("ours", ours, handle.trainable_parameters()),
    ):
        optimizer = make_optimizer(params, CHECK_LR, device)
        loss0 = float(make_train_step(model, optimizer, False, False, device)(ids, labels))
        with torch.no_grad():
            loss1 = float(model(input_ids=ids, labels=labels, use_cache=False).loss)
        results[key] = (loss0, loss1)
    # lora_B after the step, module by module.
    b_peft, b_ours = [], []
    for module_name, wrapper in handle.wrappers():
        b_peft.append(peft_base.get_submodule(module_name).lora_B["default"].weight.detach().float().flatten())
        b_ours.append(wrapper.adapters["default"].lora_B.detach().float().flatten())
    b_err = _rel_err(torch.cat(b_ours), torch.cat(b_peft))
    (p0, p1), (o0, o1) = results["peft"], results["ours"]
    init_diff, step_diff = abs(o0 - p0) / abs(p0), abs(o1 - p1) / abs(p1)
    rtol = _loss_rtol(dtype)
    b_tol = 0.1 if rtol > 1e-3 else 1e-3
    return {
        "what": (
            "our LoRA vs peft LoRA (lora_A copied from peft): loss at init, loss after one AdamW step, lora_B after it"
        ),
        "modules": copied,
        "peft_loss_init": p0,
        "ours_loss_init": o0,
        "peft_loss_after_step": p1,
        "ours_loss_after_step": o1,
        "loss_rel_diff_init": init_diff,
        "loss_rel_diff_after_step": step_diff,
        "lora_B_rel_l2_err": b_err,
        "tolerances": {"loss_rel": rtol, "lora_B_rel_l2": b_tol},
        "passed": bool(init_diff <= rtol and step_diff <= rtol and b_err <= b_tol),
    }


def run_checks(device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for name, check in (
        ("paca_resident_vs_additive", check_paca_modes),
        ("lora_vs_peft_lora", check_lora_vs_peft),
    ):
        start = time.perf_counter()
        try:
            checks[name] = check(device, dtype, seed)
        except Exception as error:  # noqa: BLE001 - a failed check is a result, not a crash
            traceback.print_exc()
            checks[name] = {"error": f"{type(error).__name__}: {error}", "passed": False}
        free_memory(device)
        status = "skipped" if "skipped" in checks[name] else ("PASS" if checks[name].get("passed") else "FAIL")
        log(
            f"[check] {name}: {status} ({time.perf_counter() - start:.1f}s) "
            + ", ".join(f"{k}={v:.3g}" for k, v in checks[name].items() if isinstance(v, float))
        )
    return checks


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
def _field(results: dict, variant: str, key: str):
    entry = results.get(variant)
    return entry.get(key) if isinstance(entry, dict) else None


def compute_ratios(results: dict) -> dict[str, float | None]:
    t = lambda v: _field(results, v, "ms_per_step")  # noqa: E731
    m = lambda v: _field(results, v, "peak_gib")  # noqa: E731
    s = lambda v: _field(results, v, "max_seq_len")  # noqa: E731
    return {
        "paca_vs_peft_lora_time": ratio(t("paca"), t("peft_lora")),
        "paca_vs_frozen_time": ratio(t("paca"), t("frozen")),
        "paca_vs_peft_lora_memory": ratio(m("paca"), m("peft_lora")),
        "paca_vs_peft_lora_max_seq": ratio(s("paca"), s("peft_lora")),
        "paca_vs_lora_time": ratio(t("paca"), t("lora")),
        "paca_vs_lora_memory": ratio(m("paca"), m("lora")),
        "lora_vs_peft_lora_time": ratio(t("lora"), t("peft_lora")),
        "lora_vs_peft_lora_memory": ratio(m("lora"), m("peft_lora")),
        "lora_vs_peft_lora_max_seq": ratio(s("lora"), s("peft_lora")),
        "lora_vs_frozen_time": ratio(t("lora"), t("frozen")),
        "peft_lora_vs_frozen_time": ratio(t("peft_lora"), t("frozen")),
        "paca_vs_peft_paca_time": ratio(t("paca"), t("peft_paca")),
        "paca_vs_peft_paca_memory": ratio(m("paca"), m("peft_paca")),
        "paca_graphed_vs_frozen_graphed_time": ratio(t("paca_graphed"), t("frozen_graphed")),
        "paca_graphed_vs_peft_lora_graphed_time": ratio(t("paca_graphed"), t("peft_lora_graphed")),
        "lora_graphed_vs_peft_lora_graphed_time": ratio(t("lora_graphed"), t("peft_lora_graphed")),
        "peft_lora_graphed_vs_frozen_graphed_time": ratio(t("peft_lora_graphed"), t("frozen_graphed")),
    }


# Issue 3's "done when" thresholds (H100, llama3-8b, seq 2048).
CRITERIA = (
    ("paca_vs_peft_lora_time", "<=", 0.65),
    ("paca_vs_frozen_time", "<=", 1.06),
    ("paca_vs_peft_lora_memory", "<=", 0.78),
    ("paca_vs_peft_lora_max_seq", ">=", 1.35),
    ("lora_vs_peft_lora_time", "<=", 0.90),
    ("lora_vs_peft_lora_memory", "<=", 1.0),
    # The same time targets with every variant's step captured as a CUDA graph.
    ("paca_graphed_vs_peft_lora_graphed_time", "<=", 0.65),
    ("paca_graphed_vs_frozen_graphed_time", "<=", 1.06),
    ("lora_graphed_vs_peft_lora_graphed_time", "<=", 0.90),
)


def evaluate_criteria(ratios: dict[str, float | None]) -> dict[str, bool | None]:
    out = {}
    for key, op, bound in CRITERIA:
        value = ratios.get(key)
        out[f"{key} {op} {bound}"] = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return out


def print_summary(report: dict) -> None:
    results = report["results"]
    rows = []
    frozen_ms, peft_ms, peft_mem = (
        _field(results, "frozen", "ms_per_step"),
        _field(results, "peft_lora", "ms_per_step"),
        _field(results, "peft_lora", "peak_gib"),
    )
    for variant in [*VARIANTS, *GRAPHED, *EXTRA]:
        entry = results.get(variant)
        if entry is None and variant not in VARIANTS:
            continue
        if not isinstance(entry, dict):
            rows.append([variant, "null", None, None, None, None, None, None])
            continue
        if "error" in entry:
            rows.append([variant, "error", None, None, None, None, None, None])
            continue
        rows.append(
            [
                variant,
                entry["ms_per_step"],
                entry["peak_gib"],
                entry.get("max_seq_len"),
                entry.get("trainable_params"),
                ratio(entry["ms_per_step"], frozen_ms),
                ratio(entry["ms_per_step"], peft_ms),
                ratio(entry["peak_gib"], peft_mem),
            ]
        )
    headers = [
        "variant",
        "ms/step",
        "peak GiB",
        "max seq",
        "trainable",
        "t/frozen",
        "t/peft_lora",
        "mem/peft_lora",
    ]
    log("")
    log(
        f"{report['model']} on {report['device']}, batch {report['batch']} x seq {report['seq_len']}, "
        f"{report['dtype']}{' + autocast' if report['autocast'] else ''}; torch {report['torch']}, "
        f"transformers {report['transformers']}, peft {report['peft']}"
    )
    log(format_table(headers, rows))
    for name, check in report.get("checks", {}).items():
        status = "skipped" if "skipped" in check else ("PASS" if check.get("passed") else "FAIL")
        log(f"check {name}: {status}")
    if report.get("criteria"):
        log("issue 3 targets (meaningful for the H100, llama3-8b, seq 2048 run only):")
    for criterion, passed in report.get("criteria", {}).items():
        log(
            f"criterion {criterion}: {'-' if passed is None else ('PASS' if passed else 'FAIL')}"
            f" ({report['ratios'].get(criterion.split()[0])})"
        )


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(MODEL_CONFIGS), default="llama3-8b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS + GRAPHED + EXTRA)}"
    )
    parser.add_argument("--no-max-seq", action="store_true", help="skip the longest-sequence search")
    parser.add_argument("--max-seq-step", type=int, default=512, help="granularity of the max-seq search")
    parser.add_argument("--max-seq-cap", type=int, default=131072, help="largest sequence length probed")
    parser.add_argument("--no-checks", action="store_true", help="skip the tiny-model correctness checks")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="model dtype; default bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--autocast", action="store_true", help="run forward under torch.autocast(bfloat16)")
    parser.add_argument(
        "--sdpa-backend",
        choices=SDPA_BACKENDS,
        default="default",
        help="pin scaled_dot_product_attention's backend in every variant (default: PyTorch's choice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile 3 steps per variant: GPU-busy ms/step vs wall ms/step, top ops",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.collect(); gc.freeze() after building each model (fewer, shorter GC pauses)",
    )
    parser.add_argument(
        "--diagnose",
        type=int,
        default=0,
        metavar="N",
        help="after timing, N more eager steps with each phase's host/GPU time, GC pauses and "
        "allocator events recorded (results[variant]['phases'])",
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "llm_step.json"))
    args = parser.parse_args(argv)
    args.variants = parse_variants(parser, args.variants, VARIANTS + GRAPHED + EXTRA)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "model": args.config,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "results": {},
        "dtype": str(dtype).replace("torch.", ""),
        "autocast": args.autocast,
        "sdpa_backend": args.sdpa_backend,
        "steps": args.steps,
        "warmup": args.warmup,
        "targets": TARGETS,
        "model_config": {
            **MODEL_CONFIGS[args.config],
            "attn_implementation": "sdpa",
            "gradient_checkpointing": False,
        },
        "optimizer": f"torch.optim.AdamW(lr={TIMING_LR}, fused={device.type == 'cuda'})",
        **package_versions("transformers", "peft"),
        "cuda": torch.version.cuda,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "peft_has_paca": peft_has_paca(),
        "notes": {
            "frozen": (
                "all weights frozen; inputs_embeds (requires_grad) so backward computes dX "
                "through every layer; no optimizer step"
            ),
            "peak_gib": (
                "torch.cuda.max_memory_allocated over the timed steps (weights + optimizer state + activations)"
            ),
            "max_seq_len": "longest batch-1 sequence (multiple of max_seq_step) for which one training step fits",
            "max_seq_step": args.max_seq_step,
            "max_seq_cap": args.max_seq_cap,
        },
    }
    log(
        f"llm_step: {args.config} on {report['device']} ({report['dtype']}), torch {report['torch']}, "
        f"transformers {report['transformers']}, peft {report['peft']}; variants {args.variants}"
    )

    if not args.no_checks:
        report["checks"] = run_checks(device, dtype, args.seed)
        write_json(args.out, report)

    for name in VARIANTS + GRAPHED + EXTRA:
        if name not in args.variants:
            if name in VARIANTS:
                report["results"][name] = None
            continue
        free_memory(device)
        try:
            report["results"][name] = run_variant(name, args, device, dtype)
        except Exception as error:  # noqa: BLE001 - keep the other variants' numbers
            traceback.print_exc()
            report["results"][name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        free_memory(device)
        report["ratios"] = compute_ratios(report["results"])
        write_json(args.out, report)

    report["ratios"] = compute_ratios(report["results"])
    report["criteria"] = evaluate_criteria(report["ratios"])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)
    print_summary(report)
    log(f"wrote {args.out} ({report['wall_s']}s)")
    return report


if __name__ == "__main__":
    main()
