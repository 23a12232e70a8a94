"""Model families: each objective against a float64 reference of its formula, detection, and one
training step per family on the micro pipelines (tests/pipelines/micro_families.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from micro_families import micro_flux, micro_sd3, micro_sdxl
from micro_sd import micro_pipeline

from pipelines.base import load_base
from pipelines.errors import UserError
from pipelines.families import FAMILIES, family_from_folder, family_of, get_family
from pipelines.train import Batch, step_generator, step_inputs

BUILDERS = {"sdxl": micro_sdxl, "sd3": micro_sd3, "flux": micro_flux}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) and root / name for name, build in BUILDERS.items()}


def _batch(seed: int) -> Batch:
    pixels = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return Batch(pixels, ["a red star", "a blue moon"])


def _reference_latents(pipe, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """The VAE sample the step draws first, in float64: (mean + std * eps - shift) * scale."""
    posterior = pipe.vae.encode(batch.pixel_values).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=generator).double()
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (posterior.mean.double() + posterior.std.double() * eps - shift) * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_prediction_objective_matches_the_ddpm_formula_in_float64(tmp_path, prediction_type):
    pipe = micro_pipeline(tmp_path / "sd")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    seed = int(torch.randint(0, 2**31, ()))
    inputs = step_inputs(pipe, _batch(seed), step_generator(seed, 0), "cpu", torch.float32)

    generator = step_generator(seed, 0)  # the same draws, in the same order: latent sample, noise, timestep
    with torch.no_grad():
        x0 = _reference_latents(pipe, _batch(seed), generator)
    eps = torch.randn(x0.shape, generator=generator).double()
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,), generator=generator)
    config = pipe.scheduler.config  # scaled_linear betas: linspace in sqrt(beta), squared
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps).double() ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0

    assert torch.equal(inputs.model_inputs["timestep"], t)
    torch.testing.assert_close(inputs.noisy.double(), noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.target.double(), target, rtol=1e-5, atol=1e-5)
    assert inputs.weight is None


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_rectified_flow_objective_matches_its_formula_in_float64(folders, name):
    """x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0; sigma = the time shift of a logit-normal u:
    SD3 a fixed shift s (s u / (1 + (s - 1) u)); Flux-dev exp(mu) / (exp(mu) + 1/u - 1) with mu linear
    in the image tokens (its reference code's form)."""
    pipe = load_base(folders[name], device="cpu")
    seed = int(torch.randint(0, 2**31, ()))
    inputs = step_inputs(pipe, _batch(seed), step_generator(seed, 0), "cpu", torch.float32)

    generator = step_generator(seed, 0)
    with torch.no_grad():
        x0 = _reference_latents(pipe, _batch(seed), generator)
    eps = torch.randn(x0.shape, generator=generator).double()
    u = torch.sigmoid(torch.randn((2,), generator=generator).double())
    config = pipe.scheduler.config
    if name == "sd3":
        s = config.shift
        sigma = s * u / (1 + (s - 1) * u)
        timestep = sigma * 1000
    else:
        tokens = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
        m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + m * (tokens - config.base_image_seq_len)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        timestep = sigma
    s4 = sigma.view(-1, 1, 1, 1)
    noisy, target = (1 - s4) * x0 + s4 * eps, eps - x0
    if name == "flux":  # 2x2 patches packed into tokens, as FluxPipeline._pack_latents does
        from diffusers import FluxPipeline

        n, c, h, w = x0.shape
        noisy, target = (FluxPipeline._pack_latents(x, n, c, h, w) for x in (noisy, target))
        assert torch.equal(inputs.model_inputs["guidance"], torch.ones(2))
        assert inputs.model_inputs["img_ids"].shape == ((h // 2) * (w // 2), 3)

    torch.testing.assert_close(inputs.model_inputs["timestep"].double(), timestep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.noisy.double(), noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.target.double(), target, rtol=1e-5, atol=1e-5)


def test_families_are_detected_from_the_folder_and_the_pipeline(folders, tmp_path):
    micro_pipeline(tmp_path / "sd").save_pretrained(tmp_path / "sd-folder", safe_serialization=True)
    assert family_from_folder(tmp_path / "sd-folder").name == "sd"
    for name, folder in folders.items():
        assert family_from_folder(folder).name == name
        pipe = load_base(folder, device="cpu")
        assert family_of(pipe) is FAMILIES[name] and type(pipe).__name__ == FAMILIES[name].pipeline_class


def test_an_unsupported_pipeline_class_is_refused_by_name(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="KandinskyPipeline is not a model family.*--family"):
        load_base(folder, device="cpu")
    with pytest.raises(UserError, match="unknown model family 'sd4'"):
        get_family("sd4")


def test_image_sides_must_be_a_multiple_of_vae_factor_times_patch(folders):
    pipe = load_base(folders["flux"], device="cpu")  # VAE factor 2 in the micro model, patch 2
    family_of(pipe).check_size(pipe, 16)
    with pytest.raises(UserError, match="18 is not a multiple of 4"):
        family_of(pipe).check_size(pipe, 18, "--resolution")


def test_sdxl_is_conditioned_on_each_images_original_size_and_crop(folders, tmp_path):
    """time_ids = (original h, w, crop top, left, target h, w) per image, as SDXL was trained; an
    ImageCaptionDataset's items carry the first four, and a batch without them uses the target size."""
    from PIL import Image

    from pipelines.data import ImageCaptionDataset
    from pipelines.train import sample_batch

    pipe = load_base(str(folders["sdxl"]), device="cpu")
    data = tmp_path / "data"
    data.mkdir()
    for name, size in (("wide", (40, 24)), ("tall", (24, 48))):
        Image.new("RGB", size, (200, 40, 40)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("a red star")
    dataset = ImageCaptionDataset(data, 16)
    batch = sample_batch(dataset, 2, 0, 0)
    inputs = step_inputs(pipe, batch, step_generator(0, 0), "cpu", torch.float32)
    time_ids = inputs.model_inputs["added_cond_kwargs"]["time_ids"]
    expected = [
        [*dataset[i]["original_size"].tolist(), *dataset[i]["crop_top_left"].tolist(), 16, 16] for i in batch.indices
    ]
    assert time_ids.tolist() == expected
    assert {tuple(row[:2]) for row in expected} == {(24, 40), (48, 24)} and any(row[2] or row[3] for row in expected)

    plain = step_inputs(pipe, _batch(0), step_generator(0, 0), "cpu", torch.float32)
    assert plain.model_inputs["added_cond_kwargs"]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    sd3 = step_inputs(load_base(str(folders["sd3"]), device="cpu"), batch, step_generator(0, 0), "cpu", torch.float32)
    assert "size_ids" not in sd3.model_inputs  # only SDXL takes them
