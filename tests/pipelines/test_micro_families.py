"""The micro SDXL / SD3 / Flux fixtures save, reload offline as the right class and generate deterministically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from micro_families import T5_TOKENS, micro_flux, micro_sd3, micro_sdxl
from PIL import Image

# family: (builder, pipeline class, denoiser attribute, extra call kwargs)
FAMILIES = {
    "sdxl": (micro_sdxl, "StableDiffusionXLPipeline", "unet", {}),
    "sd3": (micro_sd3, "StableDiffusion3Pipeline", "transformer", {"max_sequence_length": T5_TOKENS}),
    # FluxPipeline's default size is 128 * vae_scale_factor whatever the transformer: pass it.
    "flux": (micro_flux, "FluxPipeline", "transformer", {"max_sequence_length": T5_TOKENS, "height": 16, "width": 16}),
}
# What the pipeline feeds the denoiser for one prompt: (text sequence shape, pooled shape); CFG doubles the batch.
CONDITIONING = {
    "sdxl": ((2, 16, 24), (2, 16)),  # CLIP tokens x (8 + 16); pooled = CLIP-G projection
    "sd3": ((2, 16 + T5_TOKENS, 32), (2, 24)),  # CLIP tokens padded to T5 width, then T5 tokens; pooled 8 + 16
    "flux": ((1, T5_TOKENS, 32), (1, 8)),  # T5 tokens only; pooled = CLIP-L pooler_output (guidance is embedded)
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    root = tmp_path_factory.mktemp("micro_families")
    return {name: (spec[0](root / name), root / name) for name, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def loaded(built: dict[str, tuple[object, Path]]) -> dict[str, object]:
    from diffusers import DiffusionPipeline

    pipes = {}
    for name, (_, folder) in built.items():
        pipes[name] = DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        pipes[name].set_progress_bar_config(disable=True)
    return pipes


def _generate(pipe, family: str, prompt: str = "a red cat", seed: int = 0, **kwargs):
    extra = FAMILIES[family][3]
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, **extra, **kwargs).images[0]


def test_model_index_names_the_pipeline_class(built):
    for name, (_, folder) in built.items():
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == FAMILIES[name][1]


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_is_the_same_pipeline(built, loaded, family):
    # Same class, and the in-memory build's pixels: weights, tokenizers and scheduler config round-trip. Not bit-equal:
    # SD3/Flux differ by ~1e-6 (float rounding of the reloaded tensors; a real mismatch, such as T5 left in train mode
    # with its 0.1 dropout, gives ~1e-3).
    assert type(loaded[family]).__name__ == FAMILIES[family][1]
    original = _generate(built[family][0], family, output_type="np")
    np.testing.assert_allclose(_generate(loaded[family], family, output_type="np"), original, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_a_deterministic_16px_image(loaded, family):
    first, second = _generate(loaded[family], family), _generate(loaded[family], family)
    assert isinstance(first, Image.Image) and first.size == (16, 16)
    assert np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_runs_on_the_inputs_the_pipeline_builds(loaded, family):
    """Capture the denoiser's first call, check the conditioning dims, and replay it outside the pipeline."""
    pipe, denoiser = loaded[family], getattr(loaded[family], FAMILIES[family][2])
    calls = {}

    def capture(prompt: str) -> None:
        def hook(module, args, kwargs, output):
            calls.setdefault(prompt, (args, kwargs, output[0]))

        handle = denoiser.register_forward_hook(hook, with_kwargs=True)
        try:
            _generate(pipe, family, prompt, output_type="latent")
        finally:
            handle.remove()

    capture("red")
    capture("blue")
    args, kwargs, output = calls["red"]
    sample = args[0] if args else kwargs["hidden_states"]
    pooled = kwargs["added_cond_kwargs"]["text_embeds"] if family == "sdxl" else kwargs["pooled_projections"]
    assert (tuple(kwargs["encoder_hidden_states"].shape), tuple(pooled.shape)) == CONDITIONING[family]
    assert output.shape == sample.shape
    with torch.no_grad():
        assert torch.equal(denoiser(*args, **kwargs)[0], output)
    # The char-level tokenizers tell prompts apart (a degenerate vocab would map both to the same ids).
    assert not torch.equal(calls["blue"][1]["encoder_hidden_states"], kwargs["encoder_hidden_states"])


@pytest.mark.parametrize("family", FAMILIES)
def test_over_long_prompts_are_truncated_with_a_warning(loaded, family):
    """Longer than CLIP's 16 tokens and T5_TOKENS: padding, truncation and the warning's batch_decode all run."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root one caplog watches
    logger.addHandler(handler)
    try:
        latents = _generate(loaded[family], family, "a long prompt about a red cat on a mat", output_type="latent")
    finally:
        logger.removeHandler(handler)
    assert torch.isfinite(latents).all()
    assert any("CLIP can only handle" in m for m in messages)
    assert family == "sdxl" or any("`max_sequence_length` is set to" in m for m in messages)


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_are_deterministic(tmp_path, family):
    first, second = (FAMILIES[family][0](tmp_path, seed=3, save=False) for _ in range(2))
    for name, component in first.components.items():
        if isinstance(component, torch.nn.Module):
            theirs = second.components[name].state_dict()
            assert all(torch.equal(t, theirs[k]) for k, t in component.state_dict().items()), name
    assert not any((tmp_path).iterdir()), "save=False writes nothing"
