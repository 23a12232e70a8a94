"""Training memory and speed of LoRA on a full Llama vs QLoRAM (pruned + NF4) on the same config.

    python bench/loram_memory.py --out bench/results/loram_memory.json    # GPU: Llama-3-8B config, seq 2048
    python bench/loram_memory.py --tiny                                     # CPU smoke test (seconds)

Variants (each on a freshly built `LlamaForCausalLM`, random bf16 weights N(0, 0.02), norms 1,
SDPA attention, no gradient checkpointing, no KV cache; LoRA r=8, alpha=16 on q/k/v/o/gate/up/down,
AdamW (fused on CUDA); loss = causal-LM loss on random labels):
- lora: the full bf16 model.
- qloram_65 / qloram_85: LoRAM-Rand pruning at rho = 0.65 / 0.85 (layers [4, L-2) pruned, whole
  KV groups and MLP channels, `peft_core.methods.loram.prune(..., inplace=True)`), then every
  decoder projection in NF4 with double quantization (bitsandbytes, bf16 compute). No alignment
  step: it changes weights, not memory or time.

A `_lean` suffix (lora_lean, qloram_65_lean, qloram_85_lean) runs the same variant with the recipe
memory-bound users train with (QLoRA's own recipe uses gradient checkpointing): gradient checkpointing
of every decoder layer (non-reentrant) and the loss computed 1024 tokens at a time
(`studio.llm.chunked_token_loss_sum`, the trainer's --loss-chunk-tokens), so neither the layers'
activations nor the 2048 x 128k logits are held. Plain and lean variants are compared within their
own recipe (qloram_85_lean vs lora_lean).

Per variant: median ms/step over the timed steps and peak allocated GPU memory over them
(weights + adapter + optimizer state + activations). The issue's criterion: QLoRAM-85 peak <= 0.35x LoRA's.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
    allocated_gib,
    format_table,
    free_memory,
    log,
    random_llama,
    ratio,
    repo_on_path,
    sync,
    time_steps,
    write_json,
)

repo_on_path()

from peft_core import LoraConfig, attach  # noqa: E402
from peft_core.methods.loram import DECODER_PROJECTIONS, prune, quantize_nf4, storage_report  # noqa: E402
from studio.llm import chunked_token_loss_sum  # noqa: E402

MODELS = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
}
LORA_R, LORA_ALPHA, LR = 8, 16.0, 1e-4
LOSS_CHUNK_TOKENS = 1024  # the lean recipe's loss chunk
KEEP_FIRST, KEEP_LAST = 4, 2


def build_model(name: str, device: torch.device, seed: int):
    return random_llama({**MODELS[name], "tie_word_embeddings": False}, device, torch.bfloat16, seed)


def prepare(variant: str, args, device: torch.device):
    """(model, handle, info) for one variant, built on `device`."""
    model = build_model(args.model, device, args.seed)
    info = {}
    if variant.endswith("_lean"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        info["recipe"] = f"gradient checkpointing + loss in {LOSS_CHUNK_TOKENS}-token chunks"
    if variant.startswith("qloram_"):
        rho = int(variant.split("_")[1]) / 100
        _, index_map = prune(
            model, rho, "random", keep_first=KEEP_FIRST, keep_last=KEEP_LAST, seed=args.seed, inplace=True
        )
        free_memory(device)
        quantize_nf4(model, compute_dtype=torch.bfloat16, double_quant=True)
        free_memory(device)
        info |= {"ratio": rho, "pruned_layers": len(index_map.kept_kv_heads), "strategy": "random + NF4 (double quant)"}
    handle = attach(model, LoraConfig(targets=list(DECODER_PROJECTIONS), r=LORA_R, alpha=LORA_ALPHA))
    return model, handle, info


def run_variant(variant: str, args, device: torch.device) -> dict:
    start = time.perf_counter()
    free_memory(device)
    model, handle, info = prepare(variant, args, device)
    params = handle.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    vocab = MODELS[args.model]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=device, generator=generator)
    labels = torch.randint(0, vocab, (args.batch, args.seq_len), device=device, generator=generator)

    lean = variant.endswith("_lean")
    model.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        if lean:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            loss = (
                chunked_token_loss_sum(hidden[:, :-1], model.lm_head, labels[:, 1:], LOSS_CHUNK_TOKENS)
                / labels[:, 1:].numel()
            )
        else:
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    sync(device)
    weights_gib = allocated_gib(device)
    timing = time_steps(step, device, args.warmup, args.steps)
    first, last = float(timing["first"]), float(timing["last"])
    result = {
        "ms_per_step": round(timing["ms_per_step"], 3),
        "peak_gib": None if timing["peak_gib"] is None else round(timing["peak_gib"], 3),
        "ms_min": round(timing["ms_min"], 3),
        "ms_all": timing["ms_all"],
        "weights_gib": None if weights_gib is None else round(weights_gib, 3),  # before step 1
        "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),  # NF4: packed uint8 elements
        "trainable_params": sum(p.numel() for p in params),
        "loss_first": first,
        "loss_last": last,
        "finite": math.isfinite(first) and math.isfinite(last),
        "wall_s": round(time.perf_counter() - start, 2),
        **info,
    }
    log(
        f"[{variant}] {result['ms_per_step']:.1f} ms/step, peak {result['peak_gib']} GiB, loss "
        f"{first:.4f} -> {last:.4f}"
    )
    return result  # the model and optimizer go with this frame; the next variant frees memory first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny config, seq 64, 2 timed steps")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    parser.add_argument("--variants", default="lora,qloram_65,qloram_85,lora_lean,qloram_65_lean,qloram_85_lean")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default=None,
        help="default: bench/results/loram_memory.json (GPU), /tmp/loram_memory_tiny.json (--tiny)",
    )
    args = parser.parse_args()
    if args.tiny:
        args.model, args.seq_len, args.steps, args.warmup = "tiny", 64, 2, 1
    out = args.out or ("/tmp/loram_memory_tiny.json" if args.tiny else "bench/results/loram_memory.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    log(
        f"{device_name}: {args.model}, batch {args.batch} x seq {args.seq_len}, {args.warmup} warm-up "
        f"+ {args.steps} timed steps"
    )

    shape = MODELS[args.model]
    storage = {
        f"rho_{rho}": storage_report(
            shape["hidden_size"],
            shape["intermediate_size"],
            shape["num_hidden_layers"],
            shape["num_attention_heads"],
            shape["num_key_value_heads"],
            shape["vocab_size"],
            rho,
            keep_first=KEEP_FIRST,
            keep_last=KEEP_LAST,
        )
        for rho in (0.65, 0.85)
    }
    report = {
        "device": device_name,
        "model": args.model,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "results": {},
        "ratios": {},
        "criteria": {},
        "storage_from_config": storage,
        "torch": torch.__version__,
    }
    for variant in args.variants.split(","):
        report["results"][variant] = run_variant(variant, args, device)
        write_json(out, report)  # after every variant, so an interrupted run keeps what it measured

    results = report["results"]
    for variant in results:
        baseline = "lora_lean" if variant.endswith("_lean") else "lora"  # compare within one recipe
        if variant != baseline and baseline in results:
            report["ratios"][f"{variant}_vs_{baseline}_memory"] = ratio(
                results[variant]["peak_gib"], results[baseline]["peak_gib"]
            )
            report["ratios"][f"{variant}_vs_{baseline}_time"] = ratio(
                results[variant]["ms_per_step"], results[baseline]["ms_per_step"]
            )
    for suffix in ("", "_lean"):
        memory_85 = report["ratios"].get(f"qloram_85{suffix}_vs_lora{suffix}_memory")
        if memory_85 is not None:
            report["criteria"][f"qloram_85{suffix}_peak_le_0.35x_lora{suffix}"] = memory_85 <= 0.35
    write_json(out, report)
    rows = [[v, r["ms_per_step"], r["peak_gib"], r["weights_gib"], r["trainable_params"]] for v, r in results.items()]
    log(format_table(["variant", "ms/step", "peak GiB", "weights GiB", "trainable"], rows))
    log(f"ratios: {report['ratios']}  criteria: {report['criteria']}  -> {out}")


if __name__ == "__main__":
    main()
