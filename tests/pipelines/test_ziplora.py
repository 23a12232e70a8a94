"""ZipLoRA-style merging: the zipped factors against a dense float64 reference, the hooked mergers against
the same, the saved merge reloading as a plain LoRA, and the learned mergers on a micro SD (CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from micro_sd import ColourDataset, micro_pipeline
from torch import nn

from peft_core import LoraConfig, attach, get_handle, load
from peft_core.export import lora_factors
from peft_core.factors import attach_lora_factors
from pipelines.train import sample_batch, step_generator, step_inputs
from pipelines.ziplora import ZipLoraConfig, ZipMergers, merger_similarity, zip_merge, zipped_factors


def random_factor(out_features: int, in_features: int, rank: int, conv: bool = False):
    A = torch.randn(rank, in_features, *((3, 3) if conv else ()), dtype=torch.float64)
    B = torch.randn(out_features, rank, *((1, 1) if conv else ()), dtype=torch.float64)
    return A, B


def dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """ΔW of a linear factor pair, or of a conv pair as (out, in, kh, kw)."""
    if A.dim() == 2:
        return B @ A
    return torch.einsum("or,rikl->oikl", B.flatten(1), A)


def test_zipped_factors_are_the_column_merged_update_exactly():
    for conv in (False, True):
        out_features, in_features = 7, 5
        content, style = (
            random_factor(out_features, in_features, 3, conv),
            random_factor(out_features, in_features, 2, conv),
        )
        m_c, m_s = torch.rand(in_features, dtype=torch.float64), torch.rand(in_features, dtype=torch.float64)
        w_c, w_s = 0.7, 1.3
        A, B = zipped_factors(content, style, m_c, m_s, w_c, w_s)
        assert A.shape[0] == B.shape[1] == 5  # rank r_c + r_s
        # Reference: each update's columns (a kernel's input channels) scaled.
        if conv:
            expected = w_c * dense(*content) * m_c.view(1, -1, 1, 1) + w_s * dense(*style) * m_s.view(1, -1, 1, 1)
        else:
            expected = w_c * dense(*content) * m_c + w_s * dense(*style) * m_s
        torch.testing.assert_close(dense(A, B), expected, rtol=1e-12, atol=1e-12)
    # A layer only one LoRA adapts keeps that update (merger None = ones).
    only = random_factor(4, 3, 2)
    A, B = zipped_factors(only, None, None, None, 2.0, 1.0)
    torch.testing.assert_close(dense(A, B), 2.0 * dense(*only), rtol=1e-12, atol=1e-12)


def test_merger_similarity_is_the_absolute_cosine():
    a, b = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    expected = abs(float(a @ b) / float(a.norm() * b.norm()))
    assert abs(float(merger_similarity(a, b)) - expected) < 1e-12
    assert float(merger_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))) == 0.0


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.only_content = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.only_content(self.proj(x)).sum(-1) + self.conv(image).mean((1, 2, 3))


def test_hooked_mergers_add_the_merged_update_and_the_saved_merge_reloads_as_a_plain_lora(tmp_path):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = Small().double()
    content = {
        "proj": random_factor(5, 6, 2),
        "conv": random_factor(4, 3, 2, conv=True),
        "only_content": random_factor(5, 5, 2),
    }
    style = {"proj": random_factor(5, 6, 3), "conv": random_factor(4, 3, 1, conv=True)}
    mergers = ZipMergers(content, style, content_weight=0.8, style_weight=1.1).double()
    with torch.no_grad():
        for parameter in mergers.parameters():
            parameter.copy_(torch.rand_like(parameter) * 2)
    x, image = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        base_output = model(x, image)

    # Reference: the same model with its weights replaced by W + the dense merged update.
    reference = Small().double()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("proj", "conv", "only_content"):
            m_c, m_s = mergers.mergers(name)
            m_c = torch.ones(5, dtype=torch.float64) if m_c is None else m_c
            shape = (1, -1, 1, 1) if name == "conv" else (1, -1)
            update = 0.8 * dense(*content[name]) * m_c.view(shape)
            if name in style:
                update = update + 1.1 * dense(*style[name]) * m_s.view(shape)
            reference.get_submodule(name).weight += update
        expected = reference(x, image)
    with mergers.installed(model), torch.no_grad():
        hooked = model(x, image)
    torch.testing.assert_close(hooked, expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(model(x, image), base_output, rtol=0, atol=0)  # hooks gone

    # The merged factors as a peft_core LoRA on the base weights: same output; saved and loaded on a
    # fresh copy of the base: the same again.
    merged = mergers.merged_factors()
    # The two sides' parts, at the mergers' weights, add up to the merge.
    content_part, style_part = mergers.side_factors("content"), mergers.side_factors("style")
    for name, (A, B) in merged.items():
        parts = 0.8 * dense(*content_part[name]) + (1.1 * dense(*style_part[name]) if name in style_part else 0)
        torch.testing.assert_close(parts, dense(A, B), rtol=1e-5, atol=1e-5)
    base_state = {key: value.float() for key, value in model.state_dict().items()}
    adapted = Small()
    adapted.load_state_dict(base_state)
    handle = attach_lora_factors(adapted, merged, name="zip")
    folder = handle.save(tmp_path / "zip", name="zip")
    fresh = Small()
    fresh.load_state_dict(base_state)
    load(fresh, folder, name="zip")
    with torch.no_grad():
        torch.testing.assert_close(adapted(x.float(), image.float()), expected.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fresh(x.float(), image.float()), adapted(x.float(), image.float()), rtol=0, atol=0)


def test_learned_mergers_reproduce_each_lora_better_than_the_naive_sum(tmp_path):
    pipe = micro_pipeline(tmp_path / "tok")
    unet = pipe.unet
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    attach(unet, LoraConfig(targets=targets, r=2, alpha=2.0), name="content")
    get_handle(unet).add(LoraConfig(targets=targets, r=2, alpha=2.0), name="style")
    with torch.no_grad():  # trained-looking LoRAs: non-zero up factors
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    handle = get_handle(unet)
    content, style = lora_factors(handle, "content"), lora_factors(handle, "style")

    # Fixed evaluation inputs: each teacher (its LoRA alone) on its own images.
    generator = step_generator(123, 0)
    evaluation = {}
    for teacher in ("content", "style"):
        inputs = step_inputs(pipe, sample_batch(ColourDataset(4), 4, 0, 0), generator, "cpu", torch.float32)
        for name in handle.adapter_names:
            (handle.enable if name == teacher else handle.disable)(name)
        with torch.no_grad():
            evaluation[teacher] = (inputs, unet(**inputs.model_inputs)[0])
    for name in handle.adapter_names:
        handle.enable(name)

    def error(factors) -> float:
        """Both teachers' mean squared error of `factors` as one LoRA (alone) on the fixed inputs."""
        model_handle = attach_lora_factors(unet, factors, name="candidate")
        for name in model_handle.adapter_names:
            (model_handle.enable if name == "candidate" else model_handle.disable)(name)
        with torch.no_grad():
            total = sum(
                float(F.mse_loss(unet(**inputs.model_inputs)[0], target)) for inputs, target in evaluation.values()
            )
        model_handle.remove("candidate")
        for name in model_handle.adapter_names:
            model_handle.enable(name)
        return total

    naive = {name: zipped_factors(content[name], style[name], None, None) for name in content}
    config = ZipLoraConfig(zip_steps=40, zip_lr=0.05, zip_batch=2)
    mergers, log = zip_merge(pipe, "content", "style", ColourDataset(4), ColourDataset(4), config)
    factors = mergers.merged_factors()
    assert error(factors) < 0.9 * error(naive), (error(factors), error(naive))
    assert log[0]["similarity"] == 1.0 and log[-1]["similarity"] < 1.0  # the mergers moved apart
    assert handle.enabled_names == ["content", "style"]  # as before the merge
    assert set(factors) == set(content) and all(A.shape[0] == 4 for A, _ in factors.values())  # rank 2 + 2
