"""What each sd_step variant keeps for backward: the bytes of the activations autograd saves in one
forward of the SD 1.5 UNet, counted once per storage, the model's own weights left out.

    python bench/saved_activations.py                      # CPU, batch 1, bf16: ~1 minute
    python bench/saved_activations.py --batch 8 --device cuda

It isolates the part of peak memory an adapter's autograd Function decides (what it saves) from
what a GPU run adds on top (parameters, gradients, optimizer state, allocator slack, workspaces), and
it needs no GPU: the bytes are the same on any device for the same shapes and dtype, up to the
attention backend (CPU and CUDA SDPA may keep different tensors; the comparison is within one run).
Writes bench/results/saved_activations.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _sd import random_unet  # noqa: E402
from sd_step import prepare_variant, random_batch  # noqa: E402

VARIANTS = ("frozen", "peft_lora", "lora", "paca", "plp")


def saved_bytes(method: str, batch: int, device: torch.device, dtype: torch.dtype) -> int:
    unet = random_unet("sd15", device, dtype, seed=0)
    prepared = prepare_variant(method, unet, seed=0)
    inputs = random_batch("sd15", batch, device, dtype, seed=0)
    weights = {t.untyped_storage().data_ptr() for t in [*unet.parameters(), *unet.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    noisy = inputs.noisy.detach().requires_grad_(True) if prepared.frozen else inputs.noisy
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(noisy, inputs.timesteps, encoder_hidden_states=inputs.text)
    return sum(storages.values())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(HERE / "results" / "saved_activations.json"))
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    results = {}
    for method in args.variants.split(","):
        mib = saved_bytes(method, args.batch, device, dtype) / 2**20
        results[method] = {"saved_mib": round(mib, 2)}
        print(f"{method:10s} {mib:9.1f} MiB saved for backward", flush=True)
    if "frozen" in results:
        for entry in results.values():
            entry["over_frozen_mib"] = round(entry["saved_mib"] - results["frozen"]["saved_mib"], 2)
    report = {
        "model": "sd15 UNet (random weights)",
        "batch": args.batch,
        "latents": "64x64",
        "dtype": "bfloat16",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
