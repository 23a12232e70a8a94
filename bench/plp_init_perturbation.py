"""How far a freshly attached PLP moves the embedded tiny SD before any training.

    python bench/plp_init_perturbation.py      # CPU, a few seconds -> bench/results/plp_init_perturbation.json

The paper's PLP is not zero at init (spec section 2): dW_0 = [[A C, A D_0], [0, 0]]. Per rank and
variant (the paper's, and `centered=True`), on the layers b4m_quality.py adapts: |dW_0| / |W_0|
(Frobenius) per layer (median and max), and the relative L2 change of the UNet's epsilon prediction
on fixed noisy latents and the embedded world's prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from b4m_quality import TARGETS  # noqa: E402  (the layers B4M adapts in the quality bench)

from peft_core import PlpConfig, attach  # noqa: E402
from pipelines import load_base  # noqa: E402

PROMPTS = ["a yellow moon on a dotted green background", "a star in neon style"]


def main() -> dict:
    pipe = load_base("embedded")
    unet = pipe.unet.eval()
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(8, unet.config.in_channels, size, size, generator=generator)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (8,), generator=generator)
    ids = pipe.tokenizer(
        PROMPTS * 4, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    results = {}
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        base = unet(latents, timesteps, encoder_hidden_states=text).sample
        handle = None
        for rank in (16, 32):
            for centered in (False, True):
                name = f"r{rank}{'_centered' if centered else ''}"
                config = PlpConfig(targets=TARGETS, r=rank, centered=centered)
                if handle is None:
                    handle = attach(unet, config, name=name)
                else:
                    handle.add(config, name=name)
                for other in handle.adapter_names:
                    (handle.enable if other == name else handle.disable)(other)
                output = unet(latents, timesteps, encoder_hidden_states=text).sample
                ratios = sorted(
                    float(
                        wrapper.adapters[name].delta_weight(wrapper.base_layer).norm()
                        / wrapper.base_layer.weight.norm()
                    )
                    for _, wrapper in handle.wrappers(name)
                )
                results[name] = {
                    "layers": len(ratios),
                    "delta_over_weight_median": round(ratios[len(ratios) // 2], 4),
                    "delta_over_weight_max": round(ratios[-1], 4),
                    "epsilon_rel_change": round(float((output - base).norm() / base.norm()), 4),
                }
                print(name, results[name], flush=True)
    report = {"model": "embedded tiny SD", "targets": TARGETS, "batch": 8, "results": results}
    out = REPO / "bench" / "results" / "plp_init_perturbation.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
