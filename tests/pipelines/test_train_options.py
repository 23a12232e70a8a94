"""The training loop's options (TrainConfig fields), each against its formula or reference on the micro SD
(CPU): caption dropout and tag shuffling, noise offset, min-SNR-gamma, masked loss, regularisation images,
an EMA of the adapter, aspect-ratio buckets, Prodigy / Adafactor and the cosine-with-restarts / polynomial
schedules. Every option that draws keeps exact resume and the multi-process share."""

from __future__ import annotations

import math

import pytest
import torch
from micro_sd import ColourDataset, micro_pipeline
from PIL import Image

from peft_core import LoraConfig, load
from peft_core.io import read_safetensors
from pipelines.checkpoint import latest_checkpoint
from pipelines.cuda_graphs import prediction_loss
from pipelines.data import ImageCaptionDataset
from pipelines.errors import UserError
from pipelines.families import FAMILIES
from pipelines.train import (
    UNET_ATTENTION_TARGETS,
    Batch,
    StepOptions,
    TrainConfig,
    caption_draws,
    cuda_graph_blockers,
    loss_model,
    masked_inputs,
    regularised,
    sample_batch,
    step_generator,
    step_inputs,
    train_adapter,
    training_scheduler,
)
from pipelines.training import lr_factor, make_lr_scheduler, make_optimizer

LORA = LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4)


def tensors(handle, name="default"):
    return {k: v.detach().clone() for k, v in handle.state_dict(name).items()}


class Interrupt(Exception):
    pass


def interrupted_then_resumed(tmp_path, name, dataset_factory, train, stop_at, **kwargs):
    """The adapter of a run interrupted in step `stop_at` + 1 (its last checkpoint: `stop_at`'s) and resumed."""

    def stop(event):
        if event.kind == "step" and event.step == stop_at + 1:
            raise Interrupt

    run = tmp_path / name
    with pytest.raises(Interrupt):
        train_adapter(
            micro_pipeline(tmp_path / f"{name}-a"), dataset_factory(), LORA, train, run, on_event=stop, **kwargs
        )
    assert latest_checkpoint(run).name == f"step-{stop_at:08d}"
    return train_adapter(micro_pipeline(tmp_path / f"{name}-b"), dataset_factory(), LORA, train, run, **kwargs)


def assert_same_adapter(a, b):
    for key, value in tensors(a).items():
        assert torch.equal(value, tensors(b)[key]), key


class MaskedColours(ColourDataset):
    """ColourDataset with a loss mask per image: the left half counts, the right half not (every third: grey)."""

    def __getitem__(self, index: int) -> dict:
        mask = torch.zeros(1, 16, 16)
        mask[..., :8] = 1.0
        if index % 3 == 2:
            mask[..., 8:] = 0.5
        return {**self.items[index], "mask": mask}


# -- captions --------------------------------------------------------------------------------------


def test_caption_dropout_and_shuffling_follow_the_steps_generator_and_the_share():
    prompts = ["sks, red, star, night", "sks, blue, moon", "sks", "a, b, c, d, e"]
    options = StepOptions(caption_dropout=0.5, shuffle_captions=True, keep_tokens=1)
    drawn = caption_draws(prompts, options, step_generator(3, 7))

    generator = step_generator(3, 7)  # the reference: one seed per caption, then one uniform number per caption
    seeds = torch.randint(0, 2**62, (4,), generator=generator).tolist()
    uniforms = torch.rand((4,), generator=generator).tolist()
    for prompt, seed, uniform, got in zip(prompts, seeds, uniforms, drawn):
        tags = [t.strip() for t in prompt.split(",")]
        order = torch.randperm(len(tags) - 1, generator=torch.Generator().manual_seed(seed)).tolist()
        expected = ", ".join([tags[0]] + [tags[1:][i] for i in order])
        assert got == ("" if uniform < 0.5 else expected)
        if got:
            assert got.split(", ")[0] == "sks" or got.startswith("a")  # keep_tokens=1: the first tag stays

    # Two processes with half the batch each draw exactly the one process's captions.
    halves = [caption_draws(prompts[2 * i : 2 * i + 2], options, step_generator(3, 7), (i, 2)) for i in range(2)]
    assert halves[0] + halves[1] == drawn
    # Nothing drawn when off: the step's other draws are unchanged.
    assert caption_draws(prompts, StepOptions(), step_generator(3, 7)) == prompts


def test_caption_dropout_rate_and_its_empty_prompt_in_the_text_cache(tmp_path):
    options = StepOptions(caption_dropout=0.3)
    dropped = [p for s in range(400) for p in caption_draws(["x"] * 10, options, step_generator(0, s))]
    assert abs(dropped.count("") / len(dropped) - 0.3) < 0.02
    train = TrainConfig(steps=3, batch_size=2, caption_dropout=0.5, cache_text_embeddings=True, checkpoint_every=100)
    train_adapter(micro_pipeline(tmp_path / "tok"), ColourDataset(4), LORA, train, tmp_path / "run")
    with pytest.raises(UserError, match="shuffle_captions makes new captions every step"):
        train = TrainConfig(steps=1, shuffle_captions=True, cache_text_embeddings=True)
        train_adapter(micro_pipeline(tmp_path / "tok2"), ColourDataset(4), LORA, train, tmp_path / "run2")


# -- the objective: noise offset and min-SNR-gamma ---------------------------------------------------


def _batch(seed: int, n: int = 2) -> Batch:
    pixels = torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return Batch(pixels, ["red", "blue", "red", "blue"][:n])


def _abar(pipe, t: torch.Tensor) -> torch.Tensor:
    config = pipe.scheduler.config  # scaled_linear betas in float64
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps).double() ** 2
    return torch.cumprod(1 - betas, 0)[t]


def test_noise_offset_adds_a_per_channel_draw_to_the_noise(tmp_path):
    pipe = micro_pipeline(tmp_path / "sd")
    batch = _batch(5)
    plain = step_inputs(pipe, batch, step_generator(5, 0), "cpu", torch.float32)
    offset = step_inputs(pipe, batch, step_generator(5, 0), "cpu", torch.float32, options=StepOptions(noise_offset=0.1))

    generator = step_generator(5, 0)  # latent sample, noise, timesteps, then the offset's (N, C) draw
    with torch.no_grad():
        posterior = pipe.vae.encode(batch.pixel_values).latent_dist
    x0 = (posterior.mean.double() + posterior.std.double() * torch.randn(posterior.mean.shape, generator=generator)) * (
        pipe.vae.config.scaling_factor
    )
    eps = torch.randn(x0.shape, generator=generator).double()
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,), generator=generator)
    eps = eps + 0.1 * torch.randn((2, 4), generator=generator).double()[..., None, None]
    abar = _abar(pipe, t).view(-1, 1, 1, 1)

    assert torch.equal(offset.model_inputs["timestep"], plain.model_inputs["timestep"])  # same timesteps
    torch.testing.assert_close(offset.target.double(), eps, rtol=1e-5, atol=1e-5)  # epsilon target: the offset noise
    torch.testing.assert_close(offset.noisy.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=1e-5, atol=1e-5)
    shift = (offset.target - plain.target).double()  # constant over each (image, channel)'s pixels
    torch.testing.assert_close(shift, shift.mean((2, 3), keepdim=True).expand_as(shift), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_gamma_weights_equal_the_formula_in_float64(tmp_path, prediction_type):
    """Hang et al. 2023: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v), / 1 (x0); SNR = abar / (1 - abar)."""
    pipe = micro_pipeline(tmp_path / "sd")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    gamma = 5.0
    weights, timesteps = [], []
    for step in range(30):  # timesteps on both sides of SNR = gamma
        inputs = step_inputs(
            pipe, _batch(step), step_generator(1, step), "cpu", torch.float32, options=StepOptions(min_snr_gamma=gamma)
        )
        weights.append(inputs.weight)
        timesteps.append(inputs.model_inputs["timestep"])
    weight, t = torch.cat(weights), torch.cat(timesteps)
    snr = _abar(pipe, t) / (1 - _abar(pipe, t))
    divisor = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / divisor
    assert (snr > gamma).any() and (snr < gamma).any()
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=0)

    # The loss is the per-sample MSE weighted by them.
    inputs = step_inputs(
        pipe, _batch(0), step_generator(1, 0), "cpu", torch.float32, options=StepOptions(min_snr_gamma=gamma)
    )
    with torch.no_grad():
        prediction = pipe.unet(**inputs.model_inputs, return_dict=False)[0].double()
        per_sample = ((prediction - inputs.target.double()) ** 2).flatten(1).mean(1)
        loss = prediction_loss(pipe.unet, inputs)
    torch.testing.assert_close(loss.double(), (per_sample * inputs.weight.double()).mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rectified_flow_refuses_noise_offset_and_min_snr_in_one_line(family):
    with pytest.raises(UserError, match=r"noise_offset is for noise-prediction models.*leave out --noise-offset") as e:
        FAMILIES[family].check_objective_options(noise_offset=0.1)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"min_snr_gamma .* rectified flow.*leave out --min-snr-gamma"):
        FAMILIES[family].check_objective_options(min_snr_gamma=5.0)
    with pytest.raises(UserError, match="noise_offset"):
        FAMILIES[family].noised_inputs(None, torch.zeros(1, 4, 4, 4), {}, None, None, torch.float32, noise_offset=0.1)
    FAMILIES["sd"].check_objective_options(0.1, 5.0)  # noise prediction takes both


# -- masked loss ---------------------------------------------------------------------------------------


def test_masked_loss_is_the_mask_weighted_mse_in_latent_space(tmp_path):
    pipe = micro_pipeline(tmp_path / "sd")
    batch = _batch(2, n=3)
    masks = torch.rand((3, 1, 16, 16), generator=torch.Generator().manual_seed(9))
    masked_batch = Batch(batch.pixel_values, batch.prompts, masks=masks)
    options = StepOptions(min_snr_gamma=5.0)  # composes with per-sample weights
    plain = step_inputs(pipe, batch, step_generator(2, 0), "cpu", torch.float32, options=options)
    masked = step_inputs(pipe, masked_batch, step_generator(2, 0), "cpu", torch.float32, options=options)
    with torch.no_grad():
        loss = prediction_loss(loss_model(pipe.unet, masked), masked)
        prediction = pipe.unet(**plain.model_inputs, return_dict=False)[0].double()
    # By hand: each 2x2 patch of the 16 px mask averaged onto the 8x8 latents, broadcast over the channels.
    m = masks.double().reshape(3, 1, 8, 2, 8, 2).mean((3, 5))
    per_sample = (m * (prediction - plain.target.double()) ** 2).mean((1, 2, 3))
    expected = (per_sample * plain.weight.double()).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    # An all-ones mask changes nothing.
    ones = step_inputs(
        pipe,
        Batch(batch.pixel_values, batch.prompts, masks=torch.ones(3, 1, 16, 16)),
        step_generator(2, 0),
        "cpu",
        torch.float32,
    )
    with torch.no_grad():
        unmasked = prediction_loss(pipe.unet, step_inputs(pipe, batch, step_generator(2, 0), "cpu", torch.float32))
        torch.testing.assert_close(prediction_loss(loss_model(pipe.unet, ones), ones), unmasked, rtol=1e-6, atol=0)


def test_flux_masks_are_packed_like_its_latents():
    from diffusers import FluxPipeline

    from pipelines.cuda_graphs import StepInputs

    family = FAMILIES["flux"]
    latents = torch.randn(2, 16, 8, 12)
    target = family.pack(torch.randn(2, 16, 8, 12))
    masks = torch.rand(2, 1, 16, 24)
    inputs = masked_inputs(family, StepInputs({"hidden_states": target}, target), masks, latents)
    weight = masks.reshape(2, 1, 8, 2, 12, 2).mean((3, 5)).expand(-1, 16, -1, -1)
    expected = FluxPipeline._pack_latents(weight, 2, 16, 8, 12)
    torch.testing.assert_close(inputs.model_inputs["pixel_weight_root"] ** 2, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inputs.target, target * expected.sqrt(), rtol=1e-6, atol=1e-7)


def test_masked_loss_trains_resumes_exactly_and_needs_masks(tmp_path):
    train = TrainConfig(
        steps=5,
        batch_size=2,
        learning_rate=5e-3,
        checkpoint_every=2,
        masked_loss=True,
        noise_offset=0.05,
        caption_dropout=0.3,
        shuffle_captions=True,
        min_snr_gamma=5.0,
    )
    straight = train_adapter(micro_pipeline(tmp_path / "a"), MaskedColours(), LORA, train, tmp_path / "straight")
    resumed = interrupted_then_resumed(tmp_path, "resumed", MaskedColours, train, stop_at=2)
    assert_same_adapter(straight, resumed)
    with pytest.raises(UserError, match="masked_loss: no training image has a mask"):
        train_adapter(micro_pipeline(tmp_path / "c"), ColourDataset(), LORA, train, tmp_path / "none")


# -- regularisation images ----------------------------------------------------------------------------


def test_regularisation_loss_is_main_plus_weight_times_reg(tmp_path):
    pipe = micro_pipeline(tmp_path / "sd")
    main, reg = _batch(1), _batch(2)
    both = Batch(torch.cat([main.pixel_values, reg.pixel_values]), main.prompts + ["a dog"] * 2)
    options = StepOptions(min_snr_gamma=5.0)
    inputs = step_inputs(pipe, both, step_generator(4, 0), "cpu", torch.float32, share=(0, 1, 2), options=options)
    weighted = regularised(inputs, 2, reg_weight=0.7)
    with torch.no_grad():
        loss = prediction_loss(pipe.unet, weighted)
        prediction = pipe.unet(**inputs.model_inputs, return_dict=False)[0].double()
    per_sample = ((prediction - inputs.target.double()) ** 2).flatten(1).mean(1) * inputs.weight.double()
    torch.testing.assert_close(loss.double(), per_sample[:2].mean() + 0.7 * per_sample[2:].mean(), rtol=1e-6, atol=0)

    # Two processes, each [its training image, its regularisation image], draw the one process's rows.
    for index in range(2):
        local = Batch(
            torch.cat([main.pixel_values[index : index + 1], reg.pixel_values[index : index + 1]]),
            [main.prompts[index], "a dog"],
        )
        share = step_inputs(
            pipe, local, step_generator(4, 0), "cpu", torch.float32, share=(index, 2, 2), options=options
        )
        rows = [index, 2 + index]
        torch.testing.assert_close(share.noisy, inputs.noisy[rows], rtol=1e-5, atol=1e-5)
        assert torch.equal(share.model_inputs["timestep"], inputs.model_inputs["timestep"][rows])
        torch.testing.assert_close(share.weight, inputs.weight[rows], rtol=0, atol=0)


def test_regularisation_images_from_a_folder_train_and_resume_exactly(tmp_path):
    reg = tmp_path / "class"
    reg.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (20, 24), colour).save(reg / f"dog{i}.png")
    train = TrainConfig(
        steps=4,
        batch_size=2,
        learning_rate=5e-3,
        checkpoint_every=2,
        reg_data=str(reg),
        reg_prompt="a {dog}",
        reg_weight=0.5,
    )
    prompts = []
    import pipelines.train as loop

    real_step_inputs = loop.step_inputs

    def spy(pipe, batch, *args, **kwargs):
        prompts.append((list(batch.prompts), tuple(batch.pixel_values.shape)))
        return real_step_inputs(pipe, batch, *args, **kwargs)

    loop.step_inputs = spy
    try:
        straight = train_adapter(micro_pipeline(tmp_path / "a"), ColourDataset(), LORA, train, tmp_path / "straight")
    finally:
        loop.step_inputs = real_step_inputs
    assert all(p[2:] == ["a {dog}"] * 2 and shape == (4, 3, 16, 16) for p, shape in prompts)
    resumed = interrupted_then_resumed(tmp_path, "resumed", ColourDataset, train, stop_at=2)
    assert_same_adapter(straight, resumed)
    with pytest.raises(UserError, match="reg_data needs reg_prompt"):
        train_adapter(
            micro_pipeline(tmp_path / "c"), ColourDataset(), LORA, TrainConfig(reg_data=str(reg)), tmp_path / "x"
        )
    with pytest.raises(UserError, match="cache_latents encodes the training images only"):
        bad = TrainConfig(reg_data=str(reg), reg_prompt="a dog", cache_latents=True)
        train_adapter(micro_pipeline(tmp_path / "d"), ColourDataset(), LORA, bad, tmp_path / "y")


# -- EMA of the adapter --------------------------------------------------------------------------------


def test_ema_equals_a_float64_ema_of_the_weights_and_draws_the_grids(tmp_path, monkeypatch):
    import pipelines.train as loop

    decay, start, steps = 0.8, 2, 6
    train = TrainConfig(
        steps=steps,
        batch_size=2,
        learning_rate=1e-2,
        checkpoint_every=3,
        ema_decay=decay,
        ema_start=start,
        sample_prompts=["red"],
        sample_steps=1,
    )
    pipe = micro_pipeline(tmp_path / "tok")
    trajectory, drawn = [], []
    handle_box = {}

    def record(event):
        if event.kind == "step":
            trajectory.append({k: v.double() for k, v in tensors(handle_box["handle"]).items()})

    real_attach = loop.attach_denoiser_adapter

    def keep_handle(*args, **kwargs):
        handle_box["handle"] = real_attach(*args, **kwargs)
        return handle_box["handle"]

    def fake_generate(pipe, prompts, **kwargs):  # what the grid is drawn with
        drawn.append(tensors(handle_box["handle"]))
        return [Image.new("RGB", (16, 16))] * len(prompts)

    monkeypatch.setattr(loop, "attach_denoiser_adapter", keep_handle)
    monkeypatch.setattr(loop, "generate", fake_generate)
    handle = train_adapter(pipe, ColourDataset(), LORA, train, tmp_path / "run", on_event=record)

    expected = dict(trajectory[start - 1])  # the average is the weights up to step `start`
    for weights in trajectory[start:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    saved = read_safetensors(tmp_path / "run" / "adapter_ema" / "default" / "adapter_model.safetensors")
    assert set(saved) == set(expected)
    trained = [k for k in saved if "lora_" in k]
    assert trained and any(not torch.equal(saved[k], tensors(handle)[k]) for k in trained)
    for key in saved:
        torch.testing.assert_close(saved[key].double(), expected[key], rtol=1e-6, atol=1e-7)
    # The final grid is drawn with the average; the adapter's own weights come back after it.
    for key in saved:
        assert torch.equal(drawn[-1][key], saved[key]), key
    assert_same_adapter(handle, load(micro_pipeline(tmp_path / "t2").unet, tmp_path / "run" / "adapter" / "default"))
    ema = load(micro_pipeline(tmp_path / "t3").unet, tmp_path / "run" / "adapter_ema" / "default")
    for key, value in tensors(ema).items():
        assert torch.equal(value, saved[key])

    # Checkpointed: a resumed run ends with the same average, bit for bit.
    monkeypatch.setattr(loop, "attach_denoiser_adapter", real_attach)
    interrupted_then_resumed(tmp_path, "resumed", ColourDataset, train, stop_at=3)
    resumed = read_safetensors(tmp_path / "resumed" / "adapter_ema" / "default" / "adapter_model.safetensors")
    for key in saved:
        assert torch.equal(resumed[key], saved[key]), key


# -- aspect-ratio buckets ------------------------------------------------------------------------------


def bucket_folder(root):
    root.mkdir()
    sizes = [(48, 80), (50, 80), (64, 64), (80, 48), (80, 50), (64, 60), (70, 70)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (30 * i, 200 - 20 * i, 90)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text("red" if i % 2 else "blue")
    return root


def test_bucketed_batches_never_mix_sizes_and_share_across_processes(tmp_path):
    dataset = ImageCaptionDataset(bucket_folder(tmp_path / "data"), 32, buckets=True, bucket_step=8)
    assert len(set(dataset.bucket_ids)) == 3
    seen = set()
    for step in range(20):
        batch = sample_batch(dataset, 2, 5, step)
        assert len({dataset.bucket_ids[i] for i in batch.indices}) == 1  # one bucket, so one size
        assert batch.pixel_values.shape[0] == 2
        seen.add(tuple(batch.pixel_values.shape[-2:]))
        halves = [sample_batch(dataset, 1, 5, step, i, 2) for i in range(2)]
        assert halves[0].indices + halves[1].indices == batch.indices
        assert torch.equal(torch.cat([h.pixel_values for h in halves]), batch.pixel_values)
    assert seen == {(40, 24), (32, 32), (24, 40)}
    assert sample_batch(dataset, 2, 5, 7).indices == sample_batch(dataset, 2, 5, 7).indices  # by (seed, step)
    config = TrainConfig(buckets=True)
    assert any("buckets" in b for b in cuda_graph_blockers(config, torch.device("cuda"), 1, False))
    assert any("buckets" in b for b in cuda_graph_blockers(TrainConfig(), torch.device("cuda"), 1, False, dataset))


def test_a_bucketed_run_with_flips_resumes_exactly(tmp_path):
    data = bucket_folder(tmp_path / "data")

    def dataset():
        return ImageCaptionDataset(data, 32, buckets=True, bucket_step=8, random_flip=True)

    train = TrainConfig(steps=6, batch_size=2, learning_rate=5e-3, checkpoint_every=3, buckets=True, random_flip=True)
    straight = train_adapter(micro_pipeline(tmp_path / "a"), dataset(), LORA, train, tmp_path / "straight")
    resumed = interrupted_then_resumed(tmp_path, "resumed", dataset, train, stop_at=3)
    assert_same_adapter(straight, resumed)


# -- optimizers and schedules -----------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_the_diffusers_formulas(warmup):
    from diffusers.optimization import (
        get_cosine_with_hard_restarts_schedule_with_warmup,
        get_polynomial_decay_schedule_with_warmup,
    )

    total, lr = 40, 0.01

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)

    references = {
        ("cosine_with_restarts", 3, 1.0): get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer(), warmup, total, 3
        ),
        ("polynomial", 1, 2.0): get_polynomial_decay_schedule_with_warmup(optimizer(), warmup, total, 0.0, 2.0),
        ("polynomial", 1, 0.5): get_polynomial_decay_schedule_with_warmup(optimizer(), warmup, total, 0.0, 0.5),
    }
    for (schedule, cycles, power), reference in references.items():
        ours = make_lr_scheduler(
            optimizer(),
            TrainConfig(steps=total, lr_schedule=schedule, warmup_steps=warmup, lr_cycles=cycles, lr_power=power),
        )
        for step in range(total + 3):
            factor = reference.lr_lambdas[0](step)
            if step < warmup:  # this project's warm-up reaches 1 at its last step: (step + 1) / warmup
                factor = (step + 1) / warmup
            assert ours.lr_lambdas[0](step) == pytest.approx(factor, rel=1e-12, abs=1e-15), (schedule, step)
    # The formulas written out: three restarts, and (1 - p)^power, towards a floor.
    assert lr_factor(10, "cosine_with_restarts", 0, 40, cycles=4) == pytest.approx(1.0)
    assert lr_factor(5, "cosine_with_restarts", 0, 40, cycles=4) == pytest.approx(0.5)
    assert lr_factor(20, "polynomial", 0, 40, floor=0.1, power=2.0) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_factor(40, "polynomial", 0, 40, floor=0.1, power=2.0) == pytest.approx(0.1)
    assert lr_factor(40, "cosine_with_restarts", 0, 40, cycles=2) == 0.0


@pytest.mark.parametrize("name", ["prodigy", "adafactor"])
def test_prodigy_and_adafactor_train_and_resume_exactly(tmp_path, name):
    parameters = [torch.nn.Parameter(torch.zeros(3, 2))]
    built = make_optimizer(parameters, TrainConfig(optimizer=name, learning_rate=1.0), torch.device("cpu"))
    assert type(built).__name__ == {"prodigy": "Prodigy", "adafactor": "Adafactor"}[name]
    lr = 1.0 if name == "prodigy" else 1e-2
    train = TrainConfig(
        steps=5, batch_size=2, learning_rate=lr, checkpoint_every=2, optimizer=name, lr_schedule="cosine"
    )
    straight = train_adapter(micro_pipeline(tmp_path / "a"), ColourDataset(), LORA, train, tmp_path / "straight")
    trained = [v for k, v in tensors(straight).items() if "lora_B" in k]
    assert all(torch.isfinite(v).all() for v in trained) and any(v.abs().sum() > 0 for v in trained)
    resumed = interrupted_then_resumed(tmp_path, "resumed", ColourDataset, train, stop_at=2)
    assert_same_adapter(straight, resumed)


def test_new_optimizers_are_not_graphed():
    for name in ("prodigy", "adafactor"):
        blockers = cuda_graph_blockers(TrainConfig(optimizer=name), torch.device("cuda"), 1, False)
        assert any("not capturable" in b for b in blockers)


def test_training_scheduler_is_untouched_by_the_options(tmp_path):
    """The options add draws only where they are on: a run without them draws as before (same timesteps)."""
    pipe = micro_pipeline(tmp_path / "sd")
    scheduler = training_scheduler(pipe)
    a = step_inputs(pipe, _batch(3), step_generator(0, 1), "cpu", torch.float32, scheduler)
    b = step_inputs(pipe, _batch(3), step_generator(0, 1), "cpu", torch.float32, scheduler, options=StepOptions())
    assert torch.equal(a.noisy, b.noisy) and b.weight is None and math.isfinite(float(a.target.sum()))


# -- on a CUDA GPU: the graphed step with every graph-compatible option against the eager step -----------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@cuda
@pytest.mark.parametrize("method", ["lora", "paca"])
def test_cuda_graph_step_with_the_options_matches_the_eager_step(tmp_path, method):
    """Masks, min-SNR weights, regularisation rows, noise offset, caption draws and an EMA drawn in mid-run
    sample grids: host-side draws and fixed-shape inputs, so the graphed run trains what the eager run trains."""
    from peft_core import PacaConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = {"lora": LORA, "paca": PacaConfig(targets=UNET_ATTENTION_TARGETS, r=4)}[method]
    options = dict(
        steps=8,
        batch_size=2,
        learning_rate=1e-2,
        checkpoint_every=4,
        masked_loss=True,
        min_snr_gamma=5.0,
        noise_offset=0.05,
        caption_dropout=0.3,
        shuffle_captions=True,
        ema_decay=0.9,
        sample_every=3,
        sample_prompts=["red"],
        sample_steps=2,
        reg_prompt="a dog",
        reg_weight=0.5,
        lr_schedule="cosine",
    )

    def run(name, cuda_graph):
        pipe = micro_pipeline(tmp_path / f"tok-{name}").to("cuda")
        losses = []
        handle = train_adapter(
            pipe,
            MaskedColours(),
            config,
            TrainConfig(cuda_graph=cuda_graph, **options),
            tmp_path / name,
            on_event=lambda e: losses.append(e.loss) if e.kind == "step" else None,
            reg_dataset=ColourDataset(4),
        )
        ema = read_safetensors(tmp_path / name / "adapter_ema" / "default" / "adapter_model.safetensors")
        return tensors(handle), losses, ema

    eager, eager_losses, eager_ema = run("eager", "off")
    graphed, graphed_losses, graphed_ema = run("graphed", "on")
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-6)
    for key, value in eager.items():  # tolerances: see test_cuda_graphs (capturable vs fused AdamW rounding)
        torch.testing.assert_close(graphed[key].cpu(), value.cpu(), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(graphed_ema[key], eager_ema[key], rtol=1e-3, atol=1e-4)


def test_the_studio_checks_regularisation_flags_and_picks_a_bucket_step(tmp_path):
    from studio.train_diffusion import bucket_step, check_regularisation

    with pytest.raises(UserError, match="--reg-data needs --reg-prompt"):
        check_regularisation(TrainConfig(reg_data=str(tmp_path)))
    with pytest.raises(UserError, match="--reg-prompt needs --reg-data"):
        check_regularisation(TrainConfig(reg_prompt="a dog"))
    with pytest.raises(UserError, match="is empty"):  # the folder is checked before any model loads
        check_regularisation(TrainConfig(reg_data=str(tmp_path), reg_prompt="a dog"))
    check_regularisation(TrainConfig())
    check_regularisation(TrainConfig(reg_prompt="a dog", reg_count=4))  # the base draws them
    with pytest.raises(UserError, match="--reg-count needs --reg-prompt"):
        check_regularisation(TrainConfig(reg_count=4))
    with pytest.raises(UserError, match="give the folder or the count, not both"):
        check_regularisation(TrainConfig(reg_data=str(tmp_path), reg_prompt="a dog", reg_count=4))
    assert bucket_step(1024, 16) == 64 and bucket_step(512, 8) == 64 and bucket_step(64, 8) == 8
    assert bucket_step(264, 8) == 8  # not a multiple of 64


def test_ema_of_a_trained_text_encoder_is_saved_and_checkpointed(tmp_path):
    train = TrainConfig(
        steps=4, batch_size=2, learning_rate=1e-2, checkpoint_every=2, ema_decay=0.5, train_text_encoder=True
    )
    straight = tmp_path / "straight"
    train_adapter(micro_pipeline(tmp_path / "a"), ColourDataset(), LORA, train, straight)
    assert (straight / "checkpoints" / "step-00000004" / "text_encoder_ema" / "default").is_dir()
    saved = read_safetensors(straight / "text_encoder_adapter_ema" / "default" / "adapter_model.safetensors")
    own = read_safetensors(straight / "text_encoder_adapter" / "default" / "adapter_model.safetensors")
    assert set(saved) == set(own) and any(not torch.equal(saved[k], own[k]) for k in saved if "lora_B" in k)
    interrupted_then_resumed(tmp_path, "resumed", ColourDataset, train, stop_at=2)
    resumed = read_safetensors(
        tmp_path / "resumed" / "text_encoder_adapter_ema" / "default" / "adapter_model.safetensors"
    )
    for key in saved:
        assert torch.equal(resumed[key], saved[key]), key


def test_the_graphed_step_takes_masks_weights_and_regularisation_rows_as_inputs(tmp_path):
    """On a CPU with a stand-in graph (the step recorded once, then replayed on new inputs copied into its
    buffers): masks, min-SNR and regularisation weights are inputs like the latents, so each replay trains
    on its own step's, exactly as the eager step does."""
    from pipelines.cuda_graphs import GraphedTrainStep
    from pipelines.train import PixelWeightedDenoiser

    class StandIn:
        def __init__(self):
            self.replays = 0

        def warmup(self):
            import contextlib

            return contextlib.nullcontext()

        def capture(self, fn):
            loss = torch.zeros(())

            def replay():
                self.replays += 1
                loss.copy_(fn())

            return loss, replay

    def inputs_of(pipe, step):
        generator = step_generator(0, step)
        main, reg = _batch(step), _batch(100 + step)
        masks = torch.rand((4, 1, 16, 16), generator=torch.Generator().manual_seed(step))
        both = Batch(torch.cat([main.pixel_values, reg.pixel_values]), main.prompts + ["a dog"] * 2, masks=masks)
        options = StepOptions(min_snr_gamma=5.0, noise_offset=0.1)
        inputs = step_inputs(pipe, both, generator, "cpu", torch.float32, share=(0, 1, 2), options=options)
        return regularised(inputs, 2, 0.5)

    def run(graphed):
        pipe = micro_pipeline(tmp_path / f"tok-{graphed}")
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # frozen, as the loop freezes the base
            module.requires_grad_(False)
        from peft_core import attach

        handle = attach(pipe.unet, LoraConfig(targets=["to_q", "to_v"], r=2))
        params = handle.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        graphs = StandIn()
        step = GraphedTrainStep(PixelWeightedDenoiser(pipe.unet), optimizer, params, 1.0, graph_factory=graphs)
        losses = []
        for s in range(5):
            inputs = inputs_of(pipe, s)
            if graphed:
                losses.append(float(step(inputs)))
            else:
                loss = prediction_loss(loss_model(pipe.unet, inputs), inputs)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        assert graphs.replays == (3 if graphed else 0)
        return losses, tensors(handle)

    eager_losses, eager = run(False)
    graphed_losses, graphed = run(True)
    assert graphed_losses == eager_losses and len(set(eager_losses)) == 5
    for key, value in eager.items():
        assert torch.equal(graphed[key], value), key


# -- validation grids ------------------------------------------------------------------------------------


def test_sample_grids_record_how_to_draw_each_picture_again(tmp_path):
    """Every grid has a JSON beside it (prompt and seed per picture, the sampler and its settings); drawing
    a picture from that record with the final adapter gives the grid's tile, and --sample-seed fixes the
    seeds of every grid of the run."""
    import json

    import numpy as np

    from pipelines.train import generate

    train = TrainConfig(
        steps=2,
        batch_size=2,
        learning_rate=1e-2,
        sample_every=1,
        sample_prompts=["red", "blue"],
        sample_steps=2,
        sample_guidance=3.0,
        sample_seed=7,
    )
    pipe = micro_pipeline(tmp_path / "tok")
    train_adapter(pipe, ColourDataset(), LORA, train, tmp_path / "run")
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "final.json", "final.png", "step-000001.json", "step-000001.png",
    ]  # fmt: skip
    record = json.loads((samples / "final.json").read_text())
    assert record == json.loads((samples / "step-000001.json").read_text())  # fixed prompts and seeds
    assert record["images"] == [{"prompt": "red", "seed": 7}, {"prompt": "blue", "seed": 8}]
    assert record["sampler"] == type(pipe.scheduler).__name__
    assert record["sampler_config"]["num_train_timesteps"] == pipe.scheduler.config.num_train_timesteps
    assert (record["steps"], record["guidance"], record["adapter"]) == (2, 3.0, "trained")

    fresh = micro_pipeline(tmp_path / "t2")
    load(fresh.unet, tmp_path / "run" / "adapter" / "default")
    grid = np.asarray(Image.open(samples / "final.png").convert("RGB"))
    size = record["size"]
    for index, picture in enumerate(record["images"]):
        (again,) = generate(
            fresh, [picture["prompt"]], seed=picture["seed"], steps=record["steps"], guidance=record["guidance"],
            size=size,
        )  # fmt: skip
        tile = grid[:size, index * size : (index + 1) * size]
        assert np.array_equal(np.asarray(again.convert("RGB")), tile), picture
    # The UI's status line names them (ui.studio.sample_note).
    from ui.studio import sample_note

    assert sample_note(str(samples / "final.png")) == (
        f" · samples: seeds 7-8, {type(pipe.scheduler).__name__}, 2 steps, guidance 3.0"
    )
    assert sample_note(str(tmp_path / "elsewhere.png")) == "" and sample_note(None) == ""


# -- caches on disk ----------------------------------------------------------------------------------------


def test_caches_on_disk_are_keyed_by_content_and_serve_a_resumed_run(tmp_path, monkeypatch):
    from pipelines.families import family_of

    train = TrainConfig(
        steps=4, batch_size=2, learning_rate=1e-2, checkpoint_every=2, cache_text_embeddings=True, cache_latents=True
    )
    straight = train_adapter(micro_pipeline(tmp_path / "t1"), ColourDataset(), LORA, train, tmp_path / "straight")
    cache = tmp_path / "straight" / "cache"
    assert len(list((cache / "latents").glob("*.safetensors"))) == 2  # six images, two distinct pictures
    assert len(list((cache / "text").glob("*.safetensors"))) == 2  # "red" and "blue"

    def stop(event):
        if event.kind == "step" and event.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_adapter(micro_pipeline(tmp_path / "t2"), ColourDataset(), LORA, train, tmp_path / "r", on_event=stop)
    pipe = micro_pipeline(tmp_path / "t3")

    def encoder_ran(*args, **kwargs):
        raise AssertionError("an encoder ran although its output is in the run's cache")

    monkeypatch.setattr(type(family_of(pipe)), "posterior", encoder_ran)
    monkeypatch.setattr(type(family_of(pipe)), "encode_prompts", encoder_ran)
    resumed = train_adapter(pipe, ColourDataset(), LORA, train, tmp_path / "r")
    assert_same_adapter(resumed, straight)

    # The same pictures and captions are served from the folder; a changed picture is a new key, encoded
    # (here: refused by the patched encoder), never a stale hit.
    from pipelines.step_cache import StepCache

    def build(dataset):
        return StepCache.build(pipe, dataset, True, True, 2, torch.device("cpu"), folder=cache)

    assert build(ColourDataset()).read_from_disk == 4
    changed = ColourDataset()
    changed.items[0] = {**changed.items[0], "pixel_values": changed.items[0]["pixel_values"] * 0.5}
    with pytest.raises(AssertionError, match="an encoder ran"):
        build(changed)


def test_cached_latents_with_random_flips_follow_the_uncached_run_and_resume_exactly(tmp_path):
    """With random flips each image is cached both ways; a step takes the orientation its batch drew."""
    from pipelines.step_cache import StepCache

    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):  # left half coloured, right half grey: a mirror is another picture
        image = Image.new("RGB", (32, 32), (128, 128, 128))
        image.paste((40 * i, 200 - 30 * i, 60), (0, 0, 16, 32))
        image.save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("red" if i % 2 else "blue")

    def dataset():
        return ImageCaptionDataset(data, 32, random_flip=True)

    flipped = dataset()
    assert any(flipped[i]["flipped"] for i in range(len(flipped))) and not all(
        flipped[i]["flipped"] for i in range(len(flipped))
    )
    pipe = micro_pipeline(tmp_path / "t0")
    cache = StepCache.build(pipe, flipped, False, True, 2, torch.device("cpu"))
    for i in range(len(flipped)):  # the cached orientation is the one the item shows
        mean, _ = cache.family.posterior(pipe, flipped[i]["pixel_values"][None], torch.device("cpu"))
        torch.testing.assert_close(cache.posteriors[(i, flipped[i]["flipped"])][0], mean, rtol=1e-4, atol=1e-5)
        other = cache.posteriors[(i, not flipped[i]["flipped"])][0]
        assert (other - mean).abs().max() > 1e-2  # the other orientation is another latent

    plain = TrainConfig(steps=4, batch_size=2, learning_rate=5e-3, checkpoint_every=2, random_flip=True)
    cached = TrainConfig(**{**plain.__dict__, "cache_latents": True})
    losses = {}

    def recorder(name):
        losses[name] = []
        return lambda event: losses[name].append(event.loss) if event.kind == "step" else None

    a = train_adapter(
        micro_pipeline(tmp_path / "a"), dataset(), LORA, plain, tmp_path / "plain", on_event=recorder("p")
    )
    b = train_adapter(
        micro_pipeline(tmp_path / "b"), dataset(), LORA, cached, tmp_path / "cached", on_event=recorder("c")
    )
    torch.testing.assert_close(torch.tensor(losses["c"]), torch.tensor(losses["p"]), rtol=1e-4, atol=1e-6)
    for key, value in tensors(a).items():
        torch.testing.assert_close(tensors(b)[key], value, rtol=1e-3, atol=1e-5)
    resumed = interrupted_then_resumed(tmp_path, "resumed", dataset, cached, stop_at=2)
    assert_same_adapter(b, resumed)
