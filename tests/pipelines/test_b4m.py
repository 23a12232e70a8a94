"""Break-for-Make on a micro SD pipeline: break -> make -> compose, save/load, export (CPU)."""

from __future__ import annotations

import torch
from micro_sd import ColourDataset, micro_pipeline

from pipelines.b4m import BreakForMakeConfig, BreakForMakePipeline


def test_break_make_compose_save_and_reload(tmp_path):
    pipe = micro_pipeline(tmp_path / "tok")
    config = BreakForMakeConfig(rank=4, break_steps=3, make_steps=2, batch_size=2)
    b4m = BreakForMakePipeline(pipe, config)
    stages = []
    b4m(ColourDataset(4), ColourDataset(4), aux_styles=[ColourDataset(2)], aux_contents=[ColourDataset(2)],
        run_dir=tmp_path / "run", on_event=lambda e: stages.append(e.kind))
    assert stages.count("break-content") == 3 and stages.count("break-style") == 3 and stages.count("make") == 2
    assert b4m.handle.adapter_names == ["content", "style", "joint"]
    for _, wrapper in b4m.handle.wrappers("joint"):
        style, joint = wrapper.adapters["style"], wrapper.adapters["joint"]
        assert torch.count_nonzero(style.learnable_up) > 0  # the style run trained B
        assert not torch.equal(joint.learnable_up, style.learnable_up)  # make fine-tuned the paired B

    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 16)
    b4m.set_mix(1.0, 1.0)
    joint = pipe.unet(latents, 10, text).sample
    b4m.set_mix(content_weight=0.0, style_weight=0.0)
    no_learned = pipe.unet(latents, 10, text).sample
    assert not torch.allclose(joint, no_learned)
    images = b4m.generate(["red"], steps=2)
    assert images[0].size == (16, 16)

    reloaded = BreakForMakePipeline.from_pretrained(micro_pipeline(tmp_path / "tok2"), tmp_path / "run" / "b4m")
    reloaded.set_mix(1.0, 1.0)
    torch.testing.assert_close(reloaded.pipe.unet(latents, 10, text).sample, joint)

    export = b4m.handle.export(tmp_path / "diffusers", format="diffusers", name="joint", component="unet")
    assert (export / "pytorch_lora_weights.safetensors").is_file()
