"""Break-for-Make on a micro SD pipeline: break -> make -> compose, save/load, export (CPU)."""

from __future__ import annotations

import pytest
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
    for module_name, wrapper in b4m.handle.wrappers("content"):  # the released init mix (the default)
        base = wrapper.base_layer
        square_qkv = module_name.endswith(("to_q", "to_k", "to_v")) and base.in_features == base.out_features
        assert bool(torch.count_nonzero(wrapper.adapters["content"].frozen_up)) == square_qkv, module_name
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
        # make_init="paper": the trained D in every layer (the released make resets it in square q/k/v)
        BreakForMakeConfig(rank=4, break_steps=2, make_steps=0, batch_size=2, content_factor="up", make_init="paper"),
    )
    swapped(*data)
    for _, wrapper in swapped.handle.wrappers("joint"):
        content, style, joint = (wrapper.adapters[n] for n in ("content", "style", "joint"))
        assert torch.count_nonzero(content.learnable_up) > 0  # the content run's main factor is B
        assert torch.equal(joint.learnable_up, content.learnable_up) and torch.equal(
            joint.learnable_down, style.learnable_down
        )

    def joint_after_make(riemannian: bool, folder: str, make_optimizer: str = "released") -> dict[str, torch.Tensor]:
        b4m = BreakForMakePipeline(
            micro_pipeline(tmp_path / folder),
            BreakForMakeConfig(
                rank=4, break_steps=2, make_steps=2, batch_size=2, riemannian=riemannian, make_optimizer=make_optimizer
            ),
        )
        b4m(*data)
        return b4m.handle.state_dict(name="joint")

    plain, riemannian = joint_after_make(False, "tok2"), joint_after_make(True, "tok3")
    assert plain.keys() == riemannian.keys()
    assert any(not torch.allclose(plain[k], riemannian[k]) for k in plain)
    assert all(torch.isfinite(v).all() for v in riemannian.values())
    # the same with one AdamW (make_optimizer="adamw", the default before the released one)
    plain, riemannian = joint_after_make(False, "tok4", "adamw"), joint_after_make(True, "tok5", "adamw")
    assert any(not torch.allclose(plain[k], riemannian[k]) for k in plain)


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


def _noise_calls(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (noise, timesteps) the training scheduler noises a batch with, in order."""
    from diffusers import DDPMScheduler

    calls, original = [], DDPMScheduler.add_noise

    def recording(self, samples, noise, timesteps):
        calls.append((noise.detach().clone(), timesteps.detach().clone()))
        return original(self, samples, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    return calls


@pytest.mark.parametrize("partner_noise", ["shared", "independent"])
def test_partner_batches_reuse_the_main_batch_noise_and_timesteps(tmp_path, monkeypatch, partner_noise):
    """As released, each partner batch of a break step is noised with the main batch's noise and
    timesteps (partner_noise="shared", the default); "independent" draws its own."""
    calls = _noise_calls(monkeypatch)
    config = BreakForMakeConfig(rank=4, break_steps=1, make_steps=0, batch_size=2, partner_noise=partner_noise)
    b4m = BreakForMakePipeline(micro_pipeline(tmp_path / "tok"), config)
    b4m(ColourDataset(4), ColourDataset(4), aux_styles=[ColourDataset(2), ColourDataset(3)], aux_contents=[])
    main, partners = calls[0], calls[1:3]  # the content run's step: main batch, then its two partners
    for noise, timesteps in partners:
        same = torch.equal(noise, main[0]) and torch.equal(timesteps, main[1])
        assert same == (partner_noise == "shared")


def test_released_make_resets_the_content_down_in_square_qkv_layers_only(tmp_path):
    """make_init="released" (default): the joint D is D_0 in every square to_q/to_k/to_v (where the
    released make stage re-runs its orthogonal init) and the content run's D in cross-attention k/v
    and to_out.0; make_init="paper" keeps the content run's D everywhere."""
    data = (ColourDataset(4), ColourDataset(4), [ColourDataset(2)], [ColourDataset(2)])
    fresh = BreakForMakePipeline(micro_pipeline(tmp_path / "tok0"), BreakForMakeConfig(rank=4))
    from peft_core import PlpConfig, attach

    attach(fresh.model, PlpConfig(targets=fresh.config.targets, r=4))
    initial = {m: w.adapters["default"].learnable_down.detach().clone() for m, w in fresh.handle.wrappers("default")}

    for make_init in ("released", "paper"):
        config = BreakForMakeConfig(rank=4, break_steps=2, make_steps=0, batch_size=2, make_init=make_init)
        b4m = BreakForMakePipeline(micro_pipeline(tmp_path / make_init), config)
        b4m(*data)
        kinds = set()
        for module_name, wrapper in b4m.handle.wrappers("joint"):
            joint, content = wrapper.adapters["joint"].learnable_down, wrapper.adapters["content"].learnable_down
            base = wrapper.base_layer
            reset = module_name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") and base.in_features == base.out_features
            kinds.add(reset)
            assert not torch.equal(content, initial[module_name])  # the content run trained D here
            if make_init == "released" and reset:
                torch.testing.assert_close(joint, initial[module_name], rtol=0, atol=0)
            else:
                torch.testing.assert_close(joint, content, rtol=0, atol=0)
        assert kinds == {True, False}  # the micro UNet has both kinds of layer


def test_released_make_step_is_two_adamws_and_the_riemannian_steps_weight_decay():
    """make_optimizer="released" on float64 toy factors against a reference: the up factors' style
    gradient clipped before the content gradient is added, the down factors' summed gradient clipped,
    one AdamW per group, then p <- p (1 - lr wd) (the Riemannian AdamW on cleared gradients)."""
    torch.manual_seed(0)
    config = BreakForMakeConfig(make_lr=0.05, weight_decay=0.1, max_grad_norm=0.5)
    b4m = BreakForMakePipeline(None, config)
    ups = [torch.randn(6, 3, dtype=torch.float64, requires_grad=True)]
    downs = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True)]
    x, targets = torch.randn(4, 5, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    reference = [p.detach().clone().requires_grad_(True) for p in ups + downs]

    def losses(up, down):  # two forward passes, as the style and the content batch have
        return ((x @ down.t() @ up.t() - targets[0]) ** 2).mean(), ((x @ down.t() @ up.t() - targets[1]) ** 2).mean()

    optimizers = [torch.optim.AdamW(group, lr=0.05, weight_decay=0.1) for group in (ups, downs)]
    for _ in range(3):
        style_loss, content_loss = losses(ups[0], downs[0])
        b4m._released_make_step(style_loss, content_loss, ups, downs, optimizers)

    ref_optimizers = [torch.optim.AdamW([p], lr=0.05, weight_decay=0.1) for p in reference]
    for _ in range(3):
        style_loss, content_loss = losses(*reference)
        g_style = torch.autograd.grad(style_loss, reference)
        g_content = torch.autograd.grad(content_loss, reference)
        up_style = g_style[0] * min(1.0, 0.5 / (float(g_style[0].norm()) + 1e-6))
        down_sum = g_style[1] + g_content[1]
        reference[0].grad = up_style + g_content[0]
        reference[1].grad = down_sum * min(1.0, 0.5 / (float(down_sum.norm()) + 1e-6))
        for optimizer in ref_optimizers:
            optimizer.step()
        with torch.no_grad():
            for p in reference:
                p.mul_(1 - 0.05 * 0.1)
    for got, want in zip(ups + downs, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_released_mcp_loss_lags_the_partner_gradient_on_the_main_factor_by_one_step(tmp_path):
    """mcp_loss="released": the content D steps on the main loss plus the partner gradient of the
    *previous* step. With the partner's learning rate 0, after one step D cannot depend on the
    auxiliary pictures; after two it must. "shared" depends on them from the first step."""

    def content_down(mcp_loss: str, steps: int, aux_style, folder: str) -> list[torch.Tensor]:
        config = BreakForMakeConfig(
            rank=4, break_steps=steps, make_steps=0, batch_size=2, partner_lr_ratio=0.0, mcp_loss=mcp_loss
        )
        b4m = BreakForMakePipeline(micro_pipeline(tmp_path / folder), config)
        b4m(ColourDataset(4), ColourDataset(4), aux_styles=[aux_style], aux_contents=[ColourDataset(2)])
        return [w.adapters["content"].learnable_down.detach().clone() for _, w in b4m.handle.wrappers("content")]

    def differs(first, second) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(first, second))

    one = content_down("released", 1, ColourDataset(2), "a"), content_down("released", 1, _InvertedColours(2), "b")
    two = content_down("released", 2, ColourDataset(2), "c"), content_down("released", 2, _InvertedColours(2), "d")
    shared = content_down("shared", 1, ColourDataset(2), "e"), content_down("shared", 1, _InvertedColours(2), "f")
    assert not differs(*one) and differs(*two) and differs(*shared)


def test_a_config_saved_before_the_released_defaults_keeps_its_behaviour():
    """upgrade_config: a record without the new options resumes or reloads with what it was trained
    with (its own values first, then the old defaults), not the released defaults."""
    from pipelines.b4m import LEGACY_CONFIG, upgrade_config

    old = {"rank": 4, "break_steps": 3, "make_steps": 2, "riemannian": True, "mcp_loss": "shared"}
    config = BreakForMakeConfig(**upgrade_config(old))
    assert config.riemannian and config.mcp_loss == "shared" and config.make_steps == 2
    assert (config.basis_rows, config.make_init, config.partner_noise, config.make_optimizer) == (
        0,
        "paper",
        "independent",
        "adamw",
    )
    assert BreakForMakeConfig(**upgrade_config({"rank": 4})).make_steps == 100
    assert BreakForMakeConfig(**upgrade_config({"rank": 4, "make_init": "released"})).orthogonal_init == "all"
    assert BreakForMakeConfig().orthogonal_init == "released"
    current = {"rank": 4, "make_init": "released", "orthogonal_init": "released"}
    assert upgrade_config(current) == current and set(LEGACY_CONFIG) <= {
        f for f in BreakForMakeConfig.__dataclass_fields__
    }


def test_encode_once_encodes_each_image_once_and_trains_like_encoding_every_step(tmp_path, monkeypatch):
    """encode_once (the default) keeps each set's VAE posteriors from one pass; the step still draws its
    latent sample from the step's generator, so losses and trained factors match a run that encodes
    every batch every step, to float tolerance."""
    data = (ColourDataset(4), ColourDataset(4), [ColourDataset(2)], [ColourDataset(2)])

    def run(encode_once: bool, folder: str) -> tuple[list[float], dict[str, torch.Tensor], int]:
        pipe = micro_pipeline(tmp_path / folder)
        calls = []
        encode = pipe.vae.encode
        monkeypatch.setattr(
            pipe.vae, "encode", lambda pixels, *a, **k: calls.append(len(pixels)) or encode(pixels, *a, **k)
        )
        losses = []
        b4m = BreakForMakePipeline(
            pipe, BreakForMakeConfig(rank=4, break_steps=3, make_steps=2, batch_size=2, encode_once=encode_once)
        )
        b4m(*data, on_event=lambda e: losses.append(e.loss))
        return losses, {k: v.clone() for k, v in b4m.handle.state_dict(name="joint").items()}, sum(calls)

    every_step, every_state, every_encoded = run(False, "tok1")
    once, once_state, once_encoded = run(True, "tok2")
    assert once_encoded == 2 + 2 + 2 + 2  # each distinct image of each set once (ColourDataset: red, blue)
    assert every_encoded > 3 * once_encoded  # 1 + K batches a step, every step
    torch.testing.assert_close(torch.tensor(once), torch.tensor(every_step), rtol=1e-5, atol=1e-6)
    for key, value in every_state.items():
        torch.testing.assert_close(once_state[key], value, rtol=1e-4, atol=1e-5)
