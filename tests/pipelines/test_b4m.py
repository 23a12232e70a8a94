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
    b4m(
        ColourDataset(4),
        ColourDataset(4),
        aux_styles=[ColourDataset(2)],
        aux_contents=[ColourDataset(2)],
        run_dir=tmp_path / "run",
        on_event=lambda e: stages.append(e.kind),
    )
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


def test_a_stopped_run_resumes_from_its_finished_stages_and_ends_like_an_uninterrupted_one(tmp_path):
    import pytest

    from pipelines.train import StopRequested

    config = BreakForMakeConfig(rank=4, break_steps=3, make_steps=2, batch_size=2)
    data = (ColourDataset(4), ColourDataset(4), [ColourDataset(2)], [ColourDataset(2)])

    def joint_state(b4m) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in b4m.handle.state_dict(name="joint").items()}

    whole = BreakForMakePipeline(micro_pipeline(tmp_path / "tok1"), config)
    whole(*data, run_dir=tmp_path / "whole")
    expected = joint_state(whole)

    # Stop in the style break (after step 2 of 3): the content break is kept, nothing else.
    calls = []

    def stop_in_style(events=calls) -> bool:
        return len(events) == 3 + 2  # 3 content steps, then 2 style steps

    interrupted = BreakForMakePipeline(micro_pipeline(tmp_path / "tok2"), config)
    with pytest.raises(StopRequested, match="break-style"):
        interrupted(*data, run_dir=tmp_path / "run", on_event=lambda e: calls.append(e.kind), should_stop=stop_in_style)
    stages = tmp_path / "run" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["content"]  # whole stages only, no partial folder

    # A fresh process (fresh base) resumes: the content break is loaded, not trained again.
    kinds = []
    resumed = BreakForMakePipeline(micro_pipeline(tmp_path / "tok3"), config)
    resumed(*data, run_dir=tmp_path / "run", on_event=lambda e: kinds.append(e.kind))
    assert kinds.count("break-content") == 1 and kinds.count("break-style") == 3 and kinds.count("make") == 2
    for key, value in joint_state(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_role_swap_trains_content_into_up_and_riemannian_make_changes_the_step(tmp_path):
    data = (ColourDataset(4), ColourDataset(4), [ColourDataset(2)], [ColourDataset(2)])
    swapped = BreakForMakePipeline(
        micro_pipeline(tmp_path / "tok1"),
        BreakForMakeConfig(rank=4, break_steps=2, make_steps=0, batch_size=2, content_factor="up"),
    )
    swapped(*data)
    for _, wrapper in swapped.handle.wrappers("joint"):
        content, style, joint = (wrapper.adapters[n] for n in ("content", "style", "joint"))
        assert torch.count_nonzero(content.learnable_up) > 0  # the content run's main factor is B
        assert torch.equal(joint.learnable_up, content.learnable_up) and torch.equal(
            joint.learnable_down, style.learnable_down
        )

    def joint_after_make(riemannian: bool, folder: str) -> dict[str, torch.Tensor]:
        b4m = BreakForMakePipeline(
            micro_pipeline(tmp_path / folder),
            BreakForMakeConfig(rank=4, break_steps=2, make_steps=2, batch_size=2, riemannian=riemannian),
        )
        b4m(*data)
        return b4m.handle.state_dict(name="joint")

    plain, riemannian = joint_after_make(False, "tok2"), joint_after_make(True, "tok3")
    assert plain.keys() == riemannian.keys()
    assert any(not torch.allclose(plain[k], riemannian[k]) for k in plain)
    assert all(torch.isfinite(v).all() for v in riemannian.values())


def test_centered_b4m_starts_from_the_base_and_reloads_as_centered(tmp_path):
    """config.centered: every stage's PLP is zero at init (the base UNet's output), and the saved
    B4M state reloads as a centered adapter (same output)."""
    pipe = micro_pipeline(tmp_path / "tok")
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 16)
    base = pipe.unet(latents, 10, text).sample.detach()
    b4m = BreakForMakePipeline(
        pipe, BreakForMakeConfig(rank=4, break_steps=0, make_steps=0, batch_size=2, centered=True)
    )
    b4m(
        ColourDataset(4),
        ColourDataset(4),
        aux_styles=[ColourDataset(2)],
        aux_contents=[ColourDataset(2)],
        run_dir=tmp_path / "run",
    )
    b4m.set_mix(1.0, 1.0)
    torch.testing.assert_close(pipe.unet(latents, 10, text).sample, base, rtol=0, atol=1e-6)

    trained = BreakForMakePipeline(
        micro_pipeline(tmp_path / "tok2"),
        BreakForMakeConfig(rank=4, break_steps=2, make_steps=2, batch_size=2, centered=True),
    )
    trained(
        ColourDataset(4),
        ColourDataset(4),
        aux_styles=[ColourDataset(2)],
        aux_contents=[ColourDataset(2)],
        run_dir=tmp_path / "run2",
    )
    trained.set_mix(1.0, 1.0)
    joint = trained.pipe.unet(latents, 10, text).sample
    assert not torch.allclose(joint, base)
    reloaded = BreakForMakePipeline.from_pretrained(micro_pipeline(tmp_path / "tok3"), tmp_path / "run2" / "b4m")
    reloaded.set_mix(1.0, 1.0)
    assert all(wrapper.adapters["joint"].centered for _, wrapper in reloaded.handle.wrappers("joint"))
    torch.testing.assert_close(reloaded.pipe.unet(latents, 10, text).sample, joint)


class _InvertedColours(ColourDataset):
    """The same captions as ColourDataset, on pictures with every pixel negated."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.items = [{**item, "pixel_values": -item["pixel_values"]} for item in self.items]


def test_shared_mcp_loss_makes_the_main_factor_fit_the_partner_concepts_and_separate_does_not(tmp_path):
    """mcp_loss="shared": the content run's D also learns from the auxiliary styles; "separate": D
    learns the content loss only. With the partner's learning rate at 0 (B stays exactly 0), D after
    the break run must not depend on the auxiliary pictures when separate, and must when shared."""

    def content_run(mcp_loss: str, aux_style, folder: str) -> dict[str, torch.Tensor]:
        config = BreakForMakeConfig(
            rank=4, break_steps=2, make_steps=0, batch_size=2, partner_lr_ratio=0.0, mcp_loss=mcp_loss
        )
        b4m = BreakForMakePipeline(micro_pipeline(tmp_path / folder), config)
        b4m(ColourDataset(4), ColourDataset(4), aux_styles=[aux_style], aux_contents=[ColourDataset(2)])
        adapters = [wrapper.adapters["content"] for _, wrapper in b4m.handle.wrappers("content")]
        assert all(torch.count_nonzero(adapter.learnable_up) == 0 for adapter in adapters)  # the partner did not move
        return {str(i): adapter.learnable_down.detach().clone() for i, adapter in enumerate(adapters)}

    separate = content_run("separate", ColourDataset(2), "a"), content_run("separate", _InvertedColours(2), "b")
    shared = content_run("shared", ColourDataset(2), "c"), content_run("shared", _InvertedColours(2), "d")
    for key in separate[0]:
        torch.testing.assert_close(separate[0][key], separate[1][key], rtol=0, atol=0)
    assert any(not torch.allclose(shared[0][k], shared[1][k]) for k in shared[0])
    # and the shared D is not the separate one (same data: only the partner loss differs)
    assert any(not torch.allclose(shared[0][k], separate[0][k]) for k in shared[0])

    import pytest

    from pipelines.errors import UserError

    with pytest.raises(UserError, match="mcp_loss"):
        BreakForMakePipeline(micro_pipeline(tmp_path / "e"), BreakForMakeConfig(mcp_loss="both"))(
            ColourDataset(2), ColourDataset(2)
        )
