"""CorDA preparation (covariance collection + decomposition): peft_core vs HF PEFT's preprocess_corda.

    python bench/corda_prepare.py                 # GPU: Llama-3.2-1B shapes, 256 samples x 512 tokens, r=128
    python bench/corda_prepare.py --tiny          # CPU smoke test (tiny Llama, a few samples)

Same model (a randomly initialised `LlamaForCausalLM`, bf16 on CUDA, std 0.02, seed 0; all of
q, k, v, o, gate, up, down targeted), same calibration tokens (uniform random ids, seed 233),
same r and mode, one timed run each after one untimed warm-up forward:
- ours: `peft_core.methods.corda.prepare`, feeding --batch-size samples per forward (each
  sample is still normalised by its own max, so C is PEFT's), covariances accumulated in fp32
  in place, Cholesky-damped decomposition in fp32 on the GPU;
- peft: `preprocess_corda` with a run_model that feeds one sample per call (its hook squeezes
  dim 0, so it needs batch 1), fp32 covariances, its inv-based damping and CPU round trip.
Timings are wall-clock with the device synchronized around each phase. The result JSON also
carries each phase, the peak allocated memory, and the largest relative difference of the
singular values between the two (the §7.5 parity number; same device, same data).

Writes --out (default bench/results/corda_prepare.json; --tiny writes next to it with a
`_tiny` suffix unless --out is given).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from _common import REPO_ROOT, log, repo_on_path, sync, write_json

repo_on_path()

from peft_core.methods import corda  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    # Llama-3.2-1B shapes (1.24B parameters with the tied 128k vocabulary).
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
}


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **MODELS[name], max_position_embeddings=4096, initializer_range=0.02, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model.requires_grad_(False)


def timed(device: torch.device, run):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = run()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Llama, 4 samples x 32 tokens, r=4")
    parser.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    parser.add_argument("--n-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward for ours (PEFT needs 1)")
    parser.add_argument("--r", type=int, default=128)
    parser.add_argument("--mode", default="ipm", choices=["ipm", "kpm"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.model, args.n_samples, args.seq_len, args.batch_size, args.r = "tiny", 4, 32, 2, 4
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = args.out or str(
        REPO_ROOT / "bench" / "results" / ("corda_prepare_tiny.json" if args.tiny else "corda_prepare.json")
    )

    import peft
    from peft.tuners.lora.corda import preprocess_corda

    model = build_model(args.model, device, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(233)
    tokens = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len), generator=generator).to(device)
    log(
        f"{args.model}: {parameters / 1e9:.2f}B parameters, {args.n_samples} x {args.seq_len} tokens "
        f"on {device} ({dtype})"
    )
    with torch.no_grad():
        model(input_ids=tokens[:1], use_cache=False)  # warm-up: kernels, allocator

    # -- ours -------------------------------------------------------------------------------
    config = corda.CordaConfig(targets=TARGETS, r=args.r, alpha=float(args.r), mode=args.mode)
    batches = [tokens[i : i + args.batch_size] for i in range(0, args.n_samples, args.batch_size)]

    def step(m, ids):
        return m(input_ids=ids, use_cache=False)

    covariances, collect_s, collect_peak = timed(
        device, lambda: corda.collect_covariances(model, config, batches, step)
    )
    prepared, decompose_s, decompose_peak = timed(device, lambda: corda.prepare(model, config, covariances=covariances))
    ours_s = collect_s + decompose_s
    ours_S = {name: eigens.S.float().cpu() for name, eigens in prepared.items()}
    covariances = prepared = None  # free the GPU memory before PEFT runs
    log(f"ours: {ours_s:.2f} s (covariances {collect_s:.2f} s, decomposition {decompose_s:.2f} s)")

    # -- HF PEFT ----------------------------------------------------------------------------
    peft_config = peft.LoraConfig(
        r=args.r,
        lora_alpha=args.r,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=args.mode),
    )

    def run_model():
        with torch.no_grad():
            for i in range(args.n_samples):
                model(input_ids=tokens[i : i + 1], use_cache=False)

    _, peft_s, peft_peak = timed(device, lambda: preprocess_corda(model, peft_config, run_model=run_model))
    log(f"peft: {peft_s:.2f} s")
    worst = 0.0
    for name, module in model.named_modules():
        if hasattr(module, "eigens"):
            theirs = module.eigens.S_WC.float().cpu()
            worst = max(worst, ((ours_S[name] - theirs).abs() / theirs.abs().clamp_min(1e-30)).max().item())
            del module.eigens

    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "model": f"{args.model} (LlamaForCausalLM, {parameters / 1e9:.2f}B parameters, {str(dtype).split('.')[-1]})",
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "ours_s": round(ours_s, 3),
        "peft_s": round(peft_s, 3),
        "ratio": round(ours_s / peft_s, 3),
        "ours_phases_s": {"covariances": round(collect_s, 3), "decomposition": round(decompose_s, 3)},
        "peak_gib": {"ours_covariances": collect_peak, "ours_decomposition": decompose_peak, "peft": peft_peak},
        "max_rel_diff_singular_values": worst,
        "r": args.r,
        "mode": args.mode,
        "batch_size_ours": args.batch_size,
        "targets": TARGETS,
        "versions": {"torch": torch.__version__, "peft": peft.__version__},
    }
    write_json(out, result)
    log(f"ours / peft = {result['ratio']}; max rel diff of S = {worst:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
