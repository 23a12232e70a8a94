"""50-step SD 1.5 generation latency: the base pipeline vs two LoRA adapters merged vs applied on the fly.

    python bench/generate.py                 # GPU: SD 1.5 shapes, 512 px, batch 1 and 4 -> bench/results/generate.json
    python bench/generate.py --tiny          # CPU smoke test (tiny models, 2 steps) -> /tmp/generate_tiny.json

What one measurement is: one call of a diffusers `StableDiffusionPipeline` built from SD 1.5's configs with
random weights (bench/_sd.py: UNet, CLIP text encoder, VAE; the embedded tiny SD's CLIP tokenizer, whose
ids are a subset of SD 1.5's vocabulary, padding to 77 tokens), bf16 on CUDA: tokenize and encode the
prompt and the empty negative prompt, 50 DDIM steps with classifier-free guidance 7.5 (the UNet runs on
2 x batch latents of 64x64), and the VAE decode to 512x512 images (output_type="pt": the images stay on
the GPU; only PIL conversion is left out). Each (variant, batch) gets one warm-up call of --warmup-steps
steps, then --runs timed calls from the same seed, each ended by torch.cuda.synchronize; "ms" is their
median.

Variants, in this order on one pipeline:
- base: the plain pipeline;
- unmerged: two peft_core LoRA adapters, "content" and "style" (r=16, alpha=16 on to_q, to_k, to_v,
  to_out.0 of every attention block; random nonzero factors), both active: every adapted layer computes
  base(x) + sum of the two low-rank updates on the fly;
- merged: the same two adapters folded into the base weights with the handle's merge API
  (`handle.merge()`), so the UNet runs as the base one;
- <variant>_graphed: the same call inside `pipelines.cuda_graphs.graphed_unet(pipe)`, which is what
  `studio generate`/`compose` (`pipelines.train.generate`) do on CUDA: the first UNet call of each
  generation runs eagerly, the second records a CUDA graph, the rest replay it. The recording is
  redone in every call (adapters may change between calls), and its cost is inside the timed call.

Checks (recorded in "checks"): one UNet forward (fixed latents, timestep, text states) merged vs unmerged,
relative L2 error within bf16 tolerance, and against the base to show the adapters change the output
far more than merging does; the decoded images of the timed runs, merged vs unmerged (50 steps can grow
bf16 rounding, so that one is reported, with its own looser tolerance). "ratios" and "criteria" per
batch: issue 11's targets merged <= 1.02x base and unmerged <= 1.15x base; "criteria_studio" the same
targets for studio's default (graphed) path against the plain diffusers pipeline users would run
instead, and "ratios_graphed" graphed against graphed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import traceback
from typing import Any

import torch
from _common import (
    GIB,
    device_dtype_out,
    format_table,
    free_memory,
    log,
    parse_variants,
    ratio,
    repo_on_path,
    sync,
    write_json,
)
from _sd import (
    SCHEDULER_CONFIG,
    TEXT_CONFIGS,
    UNET_CONFIGS,
    UNET_TARGETS,
    VAE_CONFIGS,
    random_text_encoder,
    random_unet,
    random_vae,
    tokenizer,
)

repo_on_path()

from peft_core import LoraConfig, attach  # noqa: E402
from pipelines.cuda_graphs import graphed_unet  # noqa: E402

VARIANTS = ["base", "base_graphed", "unmerged", "unmerged_graphed", "merged", "merged_graphed"]
ADAPTERS = ("content", "style")
LORA_R, LORA_ALPHA = 16, 16
LORA_B_STD = 0.05  # random up-factors: each adapter moves the weights by ~20 % (RMS), clearly visible in the output
PROMPT = "a red star on a blue background"  # words of the embedded tokenizer's world
GUIDANCE = 7.5


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Pipeline and adapters.
# ---------------------------------------------------------------------------------------------
def build_pipeline(config_name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """(pipeline, text_input): SD 1.5-shaped random components; text_input says how prompts get in."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    text_config = TEXT_CONFIGS[config_name]
    try:
        text_tokenizer, text_input = tokenizer(text_config["max_position_embeddings"]), "tokenizer"
    except Exception as error:  # noqa: BLE001 - fall back to feeding embeddings, and say so
        log(f"tokenizer unavailable ({type(error).__name__}: {error}); feeding prompt_embeds instead")
        text_tokenizer, text_input = None, "prompt_embeds"
    pipe = StableDiffusionPipeline(
        vae=random_vae(config_name, device, dtype, seed),
        text_encoder=random_text_encoder(config_name, device, dtype, seed + 1),
        tokenizer=text_tokenizer,
        unet=random_unet(config_name, device, dtype, seed + 2).eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, text_input


def attach_adapters(unet: torch.nn.Module, seed: int):
    """Two LoRA adapters with random nonzero factors (A: LoRA's kaiming init, B ~ N(0, LORA_B_STD))."""
    torch.manual_seed(seed)
    handle = None
    for name in ADAPTERS:
        config = LoraConfig(targets=list(UNET_TARGETS), r=LORA_R, alpha=LORA_ALPHA)
        handle = attach(unet, config, name=name) if handle is None else handle.add(config, name=name)
    with torch.no_grad():
        for _, wrapper in handle.wrappers():
            for adapter in wrapper.adapters.values():
                adapter.lora_B.normal_(0.0, LORA_B_STD)
    handle.set_trainable([])
    return handle


def unet_probe(pipe, config_name: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """One UNet forward on fixed inputs (a CFG-sized batch of 2), for the merged == unmerged check."""
    config = UNET_CONFIGS[config_name]
    generator = torch.Generator(device=device).manual_seed(seed)
    size = config["sample_size"]
    latents = torch.randn((2, config["in_channels"], size, size), device=device, generator=generator).to(dtype)
    text = torch.randn((2, 77, config["cross_attention_dim"]), device=device, generator=generator).to(dtype)
    timesteps = torch.tensor([500, 500], device=device)
    with torch.no_grad():
        return pipe.unet(latents, timesteps, encoder_hidden_states=text).sample.float().cpu()


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
def make_call(pipe, text_input: str, batch: int, size: int, device: torch.device, seed: int, graphed: bool = False):
    """call(steps) -> images (batch, 3, size, size) in [0, 1]: one full generation, synchronized."""

    def call(steps: int) -> torch.Tensor:
        with graphed_unet(pipe, enabled=graphed):
            return eager_call(steps)

    def eager_call(steps: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        common = dict(
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            height=size,
            width=size,
            num_images_per_prompt=batch,
            generator=generator,
            output_type="pt",
        )
        if text_input == "tokenizer":
            images = pipe(PROMPT, **common).images
        else:  # fixed token ids through the text encoder inside the timed call, as a tokenizer would feed it
            ids = torch.arange(1, 78, device=device)[None] % pipe.text_encoder.config.vocab_size
            with torch.no_grad():
                prompt_embeds = pipe.text_encoder(ids)[0]
                negative_embeds = pipe.text_encoder(torch.zeros_like(ids))[0]
            images = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, **common).images
        sync(device)
        return images

    return call


def time_generation(
    call, device: torch.device, steps: int, runs: int, warmup_steps: int, batch: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """A short warm-up call (kernels, cuDNN autotuning, allocator), then `runs` timed calls."""
    is_cuda = device.type == "cuda"
    start = time.perf_counter()
    call(warmup_steps)
    warmup_s = time.perf_counter() - start
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    images = None
    for _ in range(runs):
        start = time.perf_counter()
        images = call(steps)
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return {
        "ms": round(ms, 2),
        "ms_min": round(min(times), 2),
        "ms_all": [round(t, 2) for t in times],
        "images_per_s": round(batch * 1e3 / ms, 3),
        "ms_per_denoising_step": round(ms / steps, 3),  # includes the text encoding and VAE decode, spread
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3) if is_cuda else None,
        "warmup_s": round(warmup_s, 2),
        "finite": bool(torch.isfinite(images).all()),
    }, images.float().cpu()


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
CRITERIA = (("merged_vs_base", 1.02), ("unmerged_vs_base", 1.15))  # issue 11, H100, SD 1.5, 512 px


def update_report(report: dict) -> None:
    report["ratios"], report["criteria"] = {}, {}
    for batch_key, entries in report["results"].items():
        ms = {
            v: entries[v]["ms"] if isinstance(entries.get(v), dict) and "ms" in entries[v] else None for v in VARIANTS
        }
        ratios = {
            "merged_vs_base": ratio(ms["merged"], ms["base"]),
            "unmerged_vs_base": ratio(ms["unmerged"], ms["base"]),
        }
        report["ratios"][batch_key] = ratios
        report["criteria"][batch_key] = {
            f"{key} <= {bound}": None if ratios[key] is None else ratios[key] <= bound for key, bound in CRITERIA
        }
        studio = {
            "merged_vs_base": ratio(ms["merged_graphed"], ms["base"]),
            "unmerged_vs_base": ratio(ms["unmerged_graphed"], ms["base"]),
        }
        report.setdefault("ratios_studio", {})[batch_key] = studio
        report.setdefault("criteria_studio", {})[batch_key] = {
            f"{key} <= {bound}": None if studio[key] is None else studio[key] <= bound for key, bound in CRITERIA
        }
        report.setdefault("ratios_graphed", {})[batch_key] = {
            "merged_vs_base": ratio(ms["merged_graphed"], ms["base_graphed"]),
            "unmerged_vs_base": ratio(ms["unmerged_graphed"], ms["base_graphed"]),
        }


def print_summary(report: dict) -> None:
    rows = []
    for batch_key, entries in report["results"].items():
        for variant in VARIANTS:
            entry = entries.get(variant)
            if not isinstance(entry, dict) or "ms" not in entry:
                rows.append([batch_key, variant, "error" if entry else "null", None, None, None])
                continue
            base = entries.get("base") or {}
            rows.append(
                [
                    batch_key,
                    variant,
                    entry["ms"],
                    entry["images_per_s"],
                    entry["peak_gib"],
                    ratio(entry["ms"], base.get("ms")),
                ]
            )
    log("")
    log(
        f"{report['model']} on {report['device']}, {report['steps']} steps, {report['resolution_px']} px, "
        f"{report['dtype']}; torch {report['torch']}, diffusers {report['diffusers']}"
    )
    log(format_table(["batch", "variant", "ms", "img/s", "peak GiB", "x base"], rows))
    for name, check in report.get("checks", {}).items():
        log(f"check {name}: {check}")
    for batch_key, criteria in report.get("criteria", {}).items():
        for criterion, passed in criteria.items():
            value = report["ratios"][batch_key].get(criterion.split()[0])
            log(f"batch {batch_key} {criterion}: {'-' if passed is None else ('PASS' if passed else 'FAIL')} ({value})")


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="sd15")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, 2 steps, 1 run, fp32, /tmp")
    parser.add_argument("--batches", default="1,4", help="comma list of batch sizes (images per prompt)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps; default 50 (--tiny: 2)")
    parser.add_argument(
        "--runs", type=int, default=None, help="timed calls per (variant, batch); default 3 (--tiny: 1)"
    )
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up call")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="default bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="default bench/results/generate.json on CUDA, /tmp/generate_<config>.json otherwise"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.config = "tiny"
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 50)
    args.runs = args.runs if args.runs is not None else (1 if args.tiny else 3)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.variants = parse_variants(parser, args.variants, VARIANTS)
    return args


def main(argv=None) -> dict:
    import diffusers
    import transformers

    args = parse_args(argv)
    device, dtype, out = device_dtype_out(args, "generate")
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to(dtype)
    started = time.perf_counter()
    unet_config = UNET_CONFIGS[args.config]
    vae_scale = 2 ** (len(VAE_CONFIGS[args.config]["block_out_channels"]) - 1)
    size = unet_config["sample_size"] * vae_scale
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "steps": args.steps,
        "batch": args.batches,
        "results": {str(b): {} for b in args.batches},
        "model": "sd15" if args.config == "sd15" else args.config,
        "resolution_px": size,
        "latent_size": unet_config["sample_size"],
        "dtype": str(dtype).replace("torch.", ""),
        "scheduler": "DDIMScheduler",
        "guidance_scale": GUIDANCE,
        "prompt": PROMPT,
        "runs": args.runs,
        "warmup_steps": args.warmup_steps,
        "adapters": {
            "names": list(ADAPTERS),
            "method": "lora",
            "r": LORA_R,
            "alpha": LORA_ALPHA,
            "targets": UNET_TARGETS,
            "lora_B_std": LORA_B_STD,
            "weights": [1.0, 1.0],
        },
        "output_type": "pt (VAE decode included; PIL conversion excluded)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "checks": {},
    }
    log(
        f"generate: {report['model']} on {report['device']} ({report['dtype']}), {args.steps} steps, {size} px, "
        f"batches {args.batches}, variants {args.variants}"
    )

    start = time.perf_counter()
    pipe, text_input = build_pipeline(args.config, device, dtype, args.seed)
    sync(device)
    report["text_input"] = text_input
    report["build_s"] = round(time.perf_counter() - start, 2)
    probes: dict[str, torch.Tensor] = {}
    images: dict[tuple[str, int], torch.Tensor] = {}
    handle = None

    def measure(variant: str) -> None:
        if variant not in args.variants:
            return
        if variant.endswith("_graphed") and device.type != "cuda":
            report["results"][str(args.batches[0])][variant] = {"error": "CUDA graphs need a CUDA device"}
            return
        for batch in args.batches:
            free_memory(device)
            call = make_call(
                pipe, text_input, batch, size, device, args.seed + 10, graphed=variant.endswith("_graphed")
            )
            # On file before it runs: a measurement killed by a timeout shows as such, not as absent.
            report["results"][str(batch)][variant] = {"error": "started but did not finish (killed, e.g. by a timeout)"}
            write_json(out, report)
            try:
                entry, images[variant, batch] = time_generation(
                    call, device, args.steps, args.runs, args.warmup_steps, batch
                )
            except Exception as error:  # noqa: BLE001 - keep the other measurements
                traceback.print_exc()
                entry = {"error": f"{type(error).__name__}: {error}"[:2000]}
            report["results"][str(batch)][variant] = entry
            update_report(report)
            write_json(out, report)
            log(
                f"[{variant}] batch {batch}: {entry.get('ms', 'error')} ms "
                f"(runs {entry.get('ms_all')}, peak {entry.get('peak_gib')} GiB)"
            )

    try:
        probes["base"] = unet_probe(pipe, args.config, device, dtype, args.seed + 20)
        measure("base")
        measure("base_graphed")
        if {"unmerged", "merged", "unmerged_graphed", "merged_graphed"} & set(args.variants):
            handle = attach_adapters(pipe.unet, args.seed + 30)
            probes["unmerged"] = unet_probe(pipe, args.config, device, dtype, args.seed + 20)
            measure("unmerged")
            measure("unmerged_graphed")
            handle.merge()
            probes["merged"] = unet_probe(pipe, args.config, device, dtype, args.seed + 20)
            measure("merged")
            measure("merged_graphed")
    except Exception as error:  # noqa: BLE001 - a failure is a result; keep what was measured
        traceback.print_exc()
        report["error"] = f"{type(error).__name__}: {error}"[:2000]

    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if "merged" in probes:
        err, effect = rel_l2(probes["merged"], probes["unmerged"]), rel_l2(probes["unmerged"], probes["base"])
        report["checks"]["merged_vs_unmerged_unet"] = {
            "what": "one UNet forward (fixed latents, t=500, random text states), relative L2 error",
            "rel_l2": err,
            "adapters_vs_base_rel_l2": effect,  # how much the adapters change it: must exceed rel_l2
            "tolerance": tolerance,
            "passed": bool(err <= tolerance and effect > err),
        }
    for batch in args.batches:
        if ("merged", batch) in images and ("unmerged", batch) in images:
            err = rel_l2(images["merged", batch], images["unmerged", batch])
            effect = rel_l2(images["unmerged", batch], images["base", batch]) if ("base", batch) in images else None
            report["checks"][f"merged_vs_unmerged_images_batch{batch}"] = {
                "what": f"decoded images after {args.steps} steps from the same seed, relative L2 error",
                "rel_l2": err,
                "max_abs": float((images["merged", batch] - images["unmerged", batch]).abs().max()),
                "adapters_vs_base_rel_l2": effect,
                "tolerance": 5 * tolerance,
                "passed": bool(err <= 5 * tolerance),
            }
        for variant in ("base", "unmerged", "merged"):
            if (variant, batch) in images and (f"{variant}_graphed", batch) in images:
                err = rel_l2(images[f"{variant}_graphed", batch], images[variant, batch])
                report["checks"][f"graphed_vs_eager_{variant}_images_batch{batch}"] = {
                    "what": "decoded images, graphed denoising vs eager, same seed, relative L2 error",
                    "rel_l2": err,
                    "tolerance": tolerance,
                    "passed": bool(err <= tolerance),
                }
    update_report(report)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(out, report)
    print_summary(report)
    log(f"wrote {out} ({report['wall_s']}s)")
    return report


if __name__ == "__main__":
    main()
