"""ZipLoRA-style merging: one LoRA from a content LoRA and a style LoRA, with learned per-column coefficients.

ZipLoRA (Shah et al. 2023, arXiv 2311.13600; a baseline in the Break-for-Make paper) merges the two
updates of every layer column by column,

    ΔW = w_c ΔW_c diag(m_c) + w_s ΔW_s diag(m_s),        m_c, m_s ∈ R^(input columns), both start at 1,

and learns the merger vectors so that the merged model predicts what the content LoRA alone predicts
on the content images and what the style LoRA alone predicts on the style images, while a layer's two
vectors stay apart (its columns then carry one concept, not a blend of both):

    L = mean (ε_merged(x_c) - ε_content(x_c))² + mean (ε_merged(x_s) - ε_style(x_s))²
        + λ Σ_layers |cos(m_c, m_s)|

x_c and x_s are the two training sets' images, noised the family's way at random timesteps, with their
captions. Reconstruction choices (the paper leaves them open; docs/methods/ziplora.md): the penalty is
the absolute cosine, not the paper's raw dot product, which both vectors could also lower by shrinking
while the reconstruction terms push back; a layer only one LoRA adapts keeps that LoRA's update with no
merger; Adam, 100 steps, lr 0.01, λ 0.01, one image of each set per step.

Scaling the columns of ΔW = B A scales the columns of A, so the result is an ordinary LoRA of rank
r_c + r_s: A = [A_c diag(m_c); A_s diag(m_s)], B = [w_c B_c, w_s B_s]. It saves, loads, merges and
exports (PEFT, diffusers, kohya) like any LoRA (`zipped_factors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peft_core import get_handle
from peft_core.export import Factors, lora_factors
from pipelines.errors import UserError
from pipelines.families import family_of
from pipelines.options import option

Factor = tuple[torch.Tensor, torch.Tensor]  # (A, B) with ΔW = B @ A; conv: A a kernel, B a 1x1 kernel


@dataclass
class ZipLoraConfig:
    """How the merger vectors are learned (`studio compose --merge ziplora`)."""

    zip_steps: int = option(100, help="ZipLoRA: optimizer steps that learn the merger vectors", min=1, advanced=True)
    zip_lr: float = option(0.01, help="ZipLoRA: Adam learning rate of the merger vectors", above=0, advanced=True)
    zip_similarity: float = option(
        0.01,
        help="ZipLoRA: weight of the penalty on |cos| between a layer's content and style merger vectors",
        min=0,
        advanced=True,
    )
    zip_batch: int = option(1, help="ZipLoRA: images of each set per step", min=1, advanced=True)
    zip_seed: int = option(0, help="ZipLoRA: seed of the images' order, noise and timesteps", min=0, advanced=True)


# ---------------------------------------------------------------------------------------------
# Pure tensor functions
# ---------------------------------------------------------------------------------------------


def scale_columns(A: torch.Tensor, merger: torch.Tensor) -> torch.Tensor:
    """A diag(merger): the down factor's input columns (a conv kernel's input channels) scaled."""
    return A * merger.view(1, -1, *([1] * (A.dim() - 2))).to(A.dtype)


def zipped_factors(
    content: Factor | None,
    style: Factor | None,
    content_merger: torch.Tensor | None,
    style_merger: torch.Tensor | None,
    content_weight: float = 1.0,
    style_weight: float = 1.0,
) -> Factor:
    """(A, B) of w_c ΔW_c diag(m_c) + w_s ΔW_s diag(m_s) exactly, at rank r_c + r_s; a side that is
    None (a layer only one LoRA adapts) is left out, and a None merger means all ones."""
    downs, ups = [], []
    for factor, merger, weight in ((content, content_merger, content_weight), (style, style_merger, style_weight)):
        if factor is None:
            continue
        A, B = factor
        downs.append(A if merger is None else scale_columns(A, merger))
        ups.append(B * weight)
    if not downs:
        raise ValueError("zipped_factors needs the content or the style factors of a layer")
    return torch.cat(downs, dim=0), torch.cat(ups, dim=1)


def merger_similarity(content_merger: torch.Tensor, style_merger: torch.Tensor) -> torch.Tensor:
    """|cos(m_c, m_s)|: 1 when the two vectors weight the columns alike, 0 when they use disjoint ones."""
    return F.cosine_similarity(content_merger.flatten(), style_merger.flatten(), dim=0).abs()


def low_rank_forward(base: nn.Module, A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """B(A(x)) for the layer `base`: a Linear's two matmuls, or a Conv2d's kernel then a 1x1 conv."""
    A, B = A.to(x.dtype), B.to(x.dtype)
    if isinstance(base, nn.Conv2d):
        hidden = F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
        return F.conv2d(hidden, B.reshape(B.shape[0], B.shape[1], 1, 1))
    return F.linear(F.linear(x, A), B)


def column_scaled_input(x: torch.Tensor, merger: torch.Tensor, conv: bool) -> torch.Tensor:
    """x with its input columns (conv: channels) scaled, so A(x ⊙ m) == (A diag(m))(x)."""
    return x * (merger.view(1, -1, 1, 1) if conv else merger).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The merger vectors as a module that adds the merged update to a model's layers
# ---------------------------------------------------------------------------------------------


class ZipMergers(nn.Module):
    """The merger vectors of every layer both LoRAs adapt (the only trainable tensors), the frozen
    factors, and `installed`: forward hooks that add the merged update to each layer's output."""

    def __init__(
        self, content: Factors, style: Factors, content_weight: float = 1.0, style_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.content, self.style = dict(content), dict(style)
        self.content_weight, self.style_weight = content_weight, style_weight
        self.layer_names = sorted(set(self.content) | set(self.style))
        self.shared = [name for name in self.layer_names if name in self.content and name in self.style]
        self.content_mergers = nn.ParameterList()
        self.style_mergers = nn.ParameterList()
        for name in self.shared:
            columns = self.content[name][0].shape[1]
            if self.style[name][0].shape[1] != columns:
                raise UserError(f"ZipLoRA: the two LoRAs disagree on the input size of {name!r}; same base model?")
            self.content_mergers.append(nn.Parameter(torch.ones(columns)))
            self.style_mergers.append(nn.Parameter(torch.ones(columns)))
        self._index = {name: i for i, name in enumerate(self.shared)}

    def mergers(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        index = self._index.get(name)
        if index is None:
            return None, None
        return self.content_mergers[index], self.style_mergers[index]

    def similarity(self) -> torch.Tensor:
        """Σ over the shared layers of |cos(m_c, m_s)|."""
        terms = [merger_similarity(c, s) for c, s in zip(self.content_mergers, self.style_mergers)]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def delta(self, name: str, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The merged update's output for layer `name` on input x."""
        conv = isinstance(base, nn.Conv2d)
        content_merger, style_merger = self.mergers(name)
        total = None
        for factors, merger, weight in (
            (self.content, content_merger, self.content_weight),
            (self.style, style_merger, self.style_weight),
        ):
            if name not in factors:
                continue
            A, B = factors[name]
            inputs = x if merger is None else column_scaled_input(x, merger, conv)
            part = weight * low_rank_forward(base, A, B, inputs)
            total = part if total is None else total + part
        return total

    def side_factors(self, side: str) -> Factors:
        """One LoRA's part of the merge, its columns scaled by its merger, at weight 1 ("content" or
        "style"): the two parts summed at the mergers' weights are `merged_factors`."""
        factors = self.content if side == "content" else self.style
        parts = {}
        with torch.no_grad():
            for name, factor in factors.items():
                merger = self.mergers(name)[0 if side == "content" else 1]
                merger = None if merger is None else merger.detach().float().cpu()
                A, B = zipped_factors(factor, None, merger, None)
                parts[name] = (A.float().cpu(), B.float().cpu())
        return parts

    def merged_factors(self) -> Factors:
        """The merged update of every layer as exact LoRA factors (float32, CPU)."""
        merged = {}
        with torch.no_grad():
            for name in self.layer_names:
                content_merger, style_merger = self.mergers(name)
                A, B = zipped_factors(
                    self.content.get(name),
                    self.style.get(name),
                    None if content_merger is None else content_merger.detach().float().cpu(),
                    None if style_merger is None else style_merger.detach().float().cpu(),
                    self.content_weight,
                    self.style_weight,
                )
                merged[name] = (A.float().cpu(), B.float().cpu())
        return merged

    @contextlib.contextmanager
    def installed(self, model: nn.Module) -> Iterator[None]:
        """Within the block, each adapted layer of `model` adds the merged update to its output."""
        hooks = []
        try:
            for name in self.layer_names:
                module = model.get_submodule(name)
                base = getattr(module, "base_layer", module)
                hooks.append(module.register_forward_hook(self._hook(name, base)))
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _hook(self, name: str, base: nn.Module) -> Callable:
        def add_merged(_module, args, output):
            return output + self.delta(name, base, args[0]).to(output.dtype)

        return add_merged


# ---------------------------------------------------------------------------------------------
# Learning the mergers on a diffusion pipeline
# ---------------------------------------------------------------------------------------------


def zip_merge(
    pipe,
    content: str,
    style: str,
    content_data,
    style_data,
    config: ZipLoraConfig | None = None,
    content_weight: float = 1.0,
    style_weight: float = 1.0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[ZipMergers, list[dict]]:
    """Learn the merger vectors of adapters `content` and `style` (LoRA-shaped adapters on the
    pipeline's denoiser) on their training sets; returns (the mergers, the loss log): the merged LoRA
    is `mergers.merged_factors()`.
    The two adapters stay attached at these weights, enabled afterwards as they were before."""
    from pipelines.train import sample_batch, step_generator, step_inputs

    config = config or ZipLoraConfig()
    family = family_of(pipe)
    model = family.denoiser(pipe)
    handle = get_handle(model)
    if handle is None or not {content, style} <= set(handle.adapter_names):
        raise UserError(f"ZipLoRA merges adapters {content!r} and {style!r}; load both on the denoiser first")
    factors = {}
    for name in (content, style):
        try:
            factors[name] = lora_factors(handle, name)
        except Exception as error:  # noqa: BLE001 - AdapterError: the method's update is not LoRA-shaped
            raise UserError(f"ZipLoRA merges LoRA-shaped adapters: {str(error).splitlines()[0]}") from None
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # The frozen factors live on the model's device (float32, so the merge saved from them is exact).
    on_device = {name: {m: tuple(t.to(device) for t in pair) for m, pair in f.items()} for name, f in factors.items()}
    mergers = ZipMergers(on_device[content], on_device[style], content_weight, style_weight).to(device)
    optimizer = torch.optim.Adam(mergers.parameters(), lr=config.zip_lr)
    was_enabled = handle.enabled_names
    handle.set_weight(content, content_weight)  # the teachers act at the weights the merge keeps
    handle.set_weight(style, style_weight)
    log: list[dict] = []
    try:
        for step in range(config.zip_steps):
            generator = step_generator(config.zip_seed, step)
            reconstruction = 0.0
            for teacher, dataset in ((content, content_data), (style, style_data)):
                batch = sample_batch(dataset, config.zip_batch, config.zip_seed, step)
                batch.masks = None
                with torch.no_grad():
                    inputs = step_inputs(pipe, batch, generator, device, dtype)
                    for name in handle.adapter_names:
                        (handle.enable if name == teacher else handle.disable)(name)
                    target = model(**inputs.model_inputs)[0].float()
                for name in handle.adapter_names:
                    handle.disable(name)
                with mergers.installed(model):
                    prediction = model(**inputs.model_inputs)[0].float()
                reconstruction = reconstruction + F.mse_loss(prediction, target)
            similarity = mergers.similarity().to(device)
            loss = reconstruction + config.zip_similarity * similarity
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            entry = {
                "step": step,
                "reconstruction": round(float(reconstruction.detach()), 6),
                "similarity": round(float(similarity.detach()) / max(len(mergers.shared), 1), 6),
            }
            log.append(entry)
            if progress is not None:
                progress(step + 1, entry["reconstruction"])
    finally:
        for name in handle.adapter_names:
            (handle.enable if name in was_enabled else handle.disable)(name)
    return mergers, log
