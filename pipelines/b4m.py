"""Break-for-Make (Xu et al. 2024; spec: shared/specs/break_for_make.md) on any SD pipeline.

    b4m = BreakForMakePipeline(load_base("embedded"), BreakForMakeConfig())
    b4m(content=moon_images, style=neon_images, aux_styles=[...], aux_contents=[...], run_dir="runs/b4m")
    images = b4m.generate(["a moon in neon style"], content_weight=1.0, style_weight=1.0)
    b4m.save("runs/b4m/final"); BreakForMakePipeline.from_pretrained(pipe, "runs/b4m/final")

Every targeted layer gets a PLP (peft_core.methods.plp): dW = [A; B] [C | D] with A, C frozen.
The defaults follow the released code (ICTMCG/Break-for-make, 7898be7), not the paper's text;
docs/methods/b4m.md lists every difference, the option that gives the other reading, and its test.
1. break / content: D learns the content images; B, at a 10x lower learning rate, learns several
   *other* styles (noised like the content batch), so D must work with many style partners
   (multi-correspondence projection). As released, D also fits those other styles, paired with B.
2. break / style: the mirror image: B learns the style, D learns other contents at 10x lower LR.
3. make: a joint adapter [A; B_style] [C | D_content] (D_0 again in the square q/k/v layers, where
   the released make stage re-runs its initialisation), fine-tuned on both sets.
4. compose: generate with the joint adapter; content_weight scales D and style_weight scales B.

Gradients are taken with torch.autograd.grad on exactly the factors a loss is meant to train, one
optimizer per factor. The released code gets its shared loss implicitly, by never clearing either
factor's gradient between the main and the partner backward pass (spec pitfall 5); mcp_loss
"released" replays its order of updates, "shared" sums the losses, "separate" keeps them apart.

With a run_dir, each finished break run is saved under <run_dir>/stages/<content|style> (written
to a temporary folder, then renamed: a stage is there whole or not at all), and a later call with
the same run_dir loads the finished stages instead of training them again. `should_stop()` (by
default: does <run_dir>/STOP exist?) and the stop signals (pipelines.signals) are asked after every
step; a stop raises `pipelines.training.StopRequested` and loses at most the stage in progress. Every
draw comes from (seed, stage, step), so a resumed run ends with the same adapters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peft_core import PlpConfig, attach, get_handle, load, make_joint, precondition_gradients
from peft_core.io import read_json, write_json
from peft_core.methods.plp import SQUARE_QKV
from pipelines.errors import UserError
from pipelines.families import family_of
from pipelines.options import option
from pipelines.step_cache import StepCache, deterministic_pixels
from pipelines.train import (
    UNET_ATTENTION_TARGETS,
    diffusion_loss,
    generate,
    sample_batch,
    step_generator,
    training_scheduler,
)
from pipelines.training import (
    DivergenceGuard,
    TrainEvent,
    divergence_hint,
    host_values,
    in_step_loop,
    serve_stop,
    stop_file_exists,
    stop_requested,
)

UP, DOWN = "learnable_up", "learnable_down"  # B (style) and D (content), unless content_factor="up"


@dataclass
class BreakForMakeConfig:
    """Defaults suit the embedded tiny SD; the paper used r=64, lr 1e-4, 1000 + <=200 steps on SDXL."""

    rank: int = option(8, help="PLP rank r (the paper: 64 on SDXL)", min=1)
    seed: int = option(0, help="seed of the frozen bases and every random draw", min=0, max=2**32 - 1)
    # The attention projections; on SD3/Flux these names are the image stream's q/k/v/out of every block.
    targets: list[str] = option(
        list(UNET_ATTENTION_TARGETS), help="denoiser modules to adapt (UNet or DiT)", advanced=True
    )
    break_steps: int = option(300, help="steps of each break run", min=1)
    # The released make stage runs as long as a break run (1000 steps each); the paper calls it brief.
    make_steps: int = option(
        300, help="steps of the make fine-tuning (the released code: as many as a break run)", min=0
    )
    batch_size: int = option(4, help="images per step", min=1)
    main_lr: float = option(1e-3, help="learning rate of the main PLP in each break run", above=0, advanced=True)
    partner_lr_ratio: float = option(
        0.1, help="the partner PLP's learning rate relative to the main one", min=0, advanced=True
    )
    make_lr: float = option(1e-3, help="learning rate of the make stage", above=0, advanced=True)
    weight_decay: float = option(1e-2, help="AdamW weight decay", min=0, advanced=True)
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)", min=0, advanced=True)
    # Which PLP factor learns the content: "down" (D, the released code's choice; the paper's figure
    # labels it the other way round) or "up" (B; the style then trains D).
    content_factor: str = option(
        "down",
        help="PLP factor that learns the content: 'down' (D, the released code) or 'up' (B; the style then trains D)",
        choices=("down", "up"),
        advanced=True,
    )
    # Which layers draw their frozen halves from an orthonormal basis (PlpConfig.orthogonal_init): the
    # released code only square to_q/to_k/to_v (A = 0 and a Gaussian C elsewhere, so there the content
    # D learns only once B has moved); "all" every layer (the spec's reading).
    orthogonal_init: str = option(
        "released",
        help="PLPs' orthonormal frozen halves: 'released' (square to_q/to_k/to_v only, A = 0 elsewhere) or "
        "'all' (every layer)",
        choices=("released", "all"),
        advanced=True,
    )
    # Rows of the orthonormal basis every layer's frozen halves are cut from (PlpConfig.basis_rows).
    basis_rows: int = option(
        1280,
        help="rows of the PLPs' orthonormal basis: 1280 as released, 0 for out/2 + in/2 (the tightest)",
        min=0,
        advanced=True,
    )
    # The make stage's optimizer (docs/methods/b4m.md):
    # - "released": what the released make stage's updates amount to: AdamW on B and on D, each
    #   clipped on its own (B's style-loss gradient before the content loss is added), then the
    #   Riemannian AdamW's step, which finds the gradients already cleared and so only applies its
    #   decoupled weight decay once more;
    # - "adamw": one AdamW on the summed loss (the paper's arXiv v1 make).
    make_optimizer: str = option(
        "released",
        help="make stage: 'released' (an AdamW per factor + the released Riemannian step's extra weight decay) "
        "or 'adamw' (one AdamW)",
        choices=("released", "adamw"),
        advanced=True,
    )
    # Make with Riemannian-preconditioned gradients (the TOG paper's text, spec section 2): grad_B is
    # scaled by (V V^T + delta I)^-1 and grad_D by (U^T U + delta I)^-1 before the optimizer steps.
    # The released make builds such an optimizer, but it only ever sees cleared gradients.
    riemannian: bool = option(
        False, help="make with Riemannian-preconditioned gradients (the TOG paper's text)", advanced=True
    )
    riemannian_delta: float = option(1e-6, help="damping delta of the Riemannian preconditioner", min=0, advanced=True)
    # "released": where the released make stage re-runs its orthogonal init (square to_q/to_k/to_v
    # layers) the content run's D is replaced by its seeded initial value D_0; "paper": the content
    # run's trained D in every layer, as the paper's text describes make.
    make_init: str = option(
        "released",
        help="make's joint D: 'released' (D_0 again in square q/k/v layers, as the released code) or 'paper' "
        "(the content run's D everywhere)",
        choices=("released", "paper"),
        advanced=True,
    )
    # Centered PLPs (PlpConfig.centered): the frozen A C block left out and D from zero, so every
    # stage starts from the base model itself instead of one perturbed by A C (spec pitfall 8).
    centered: bool = option(
        False,
        help="leave out the PLPs' frozen A C block and start D at zero, so training starts from the base model",
        advanced=True,
    )
    # Which loss each factor of a break run learns from (multi-correspondence projection):
    # - "released": the released code's order of updates: the main factor steps on the main loss's
    #   gradient plus the partner loss's gradient left over from the previous step (it is never
    #   cleared); then the partner loss, computed with the updated main factor, and the main loss's
    #   gradient, both step the partner factor.
    # - "shared": both factors step on the sum of the main loss and the mean partner loss, each at its
    #   own learning rate (the released updates without their one-step lag).
    # - "separate": the main factor learns only the main loss and the partner only the partner loss
    #   (the spec's reading of the released gradient leak as unintended, pitfall 5).
    mcp_loss: str = option(
        "released",
        help="break runs: 'released' (the released code's updates), 'shared' (both factors learn main + partner "
        "loss) or 'separate' (each factor learns only its own loss)",
        choices=("released", "shared", "separate"),
        advanced=True,
    )
    # The released code noises every partner batch with the main batch's noise and timesteps.
    partner_noise: str = option(
        "shared",
        help="partner batches: 'shared' (the main batch's noise and timesteps, as released) or 'independent'",
        choices=("shared", "independent"),
        advanced=True,
    )
    # Every step encodes 1 + K batches of images with the VAE (a main batch and K partner batches); the
    # sets are fixed, so their posteriors can be encoded once. The latent sample is still drawn every step
    # from the step's generator, so the draws do not change (the losses agree to float tolerance).
    encode_once: bool = option(
        True,
        help="encode every set's images with the VAE once before training (center crops); the step still draws "
        "its latent sample",
        advanced=True,
    )


# What a config written before these options existed meant (a resumed or reloaded run keeps it).
LEGACY_CONFIG = {
    "orthogonal_init": "all",
    "make_steps": 100,
    "basis_rows": 0,
    "make_optimizer": "adamw",
    "make_init": "paper",
    "mcp_loss": "separate",
    "partner_noise": "independent",
}


def upgrade_config(record: dict) -> dict:
    """A saved B4M config whose record lacks the released-behaviour options keeps the behaviour it was
    trained with (LEGACY_CONFIG), not the released defaults."""
    record = dict(record)
    if "make_init" not in record:  # written before the released behaviour became the default
        record = {**LEGACY_CONFIG, **record}
    record.setdefault("orthogonal_init", "all")  # written before the released init mix became the default
    return record


def released_reinit_layers(handle, name: str) -> set[str]:
    """The layers of adapter `name` where the released make stage re-runs its orthogonal init (and so
    replaces the content D by D_0): square projections named to_q, to_k or to_v."""
    return {
        module_name
        for module_name, wrapper in handle.wrappers(name)
        if module_name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
        and wrapper.base_layer.in_features == wrapper.base_layer.out_features
    }


def _clipped(grads: Sequence[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """`grads` scaled as clip_grad_norm_ would scale them as one group, and their norm before (None: off)."""
    if max_norm <= 0:
        return list(grads), None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * scale for g in grads], norm


def _check_step(
    guard: DivergenceGuard, done: int, loss: torch.Tensor, partner_loss: torch.Tensor | None, norms: list
) -> float:
    """Step `done`'s losses and gradient norms through one host sync into `guard` (NonFiniteLoss on NaN/inf);
    returns the main loss."""
    values = host_values(loss, partner_loss, *norms)
    losses, norm_values = [v for v in values[:2] if v is not None], values[2:]
    guard.step(done, sum(losses), sum(norm_values) if norm_values else None)
    return values[0]


class BreakForMakePipeline:
    def __init__(self, pipe, config: BreakForMakeConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config or BreakForMakeConfig()

    @property
    def model(self):
        """The denoiser the PLPs attach to (the UNet, or SD3's / Flux's transformer)."""
        return family_of(self.pipe).denoiser(self.pipe)

    @property
    def handle(self):
        return get_handle(self.model)

    def __call__(
        self,
        content,
        style,
        aux_styles: Sequence = (),
        aux_contents: Sequence = (),
        run_dir: str | os.PathLike | None = None,
        on_event: Callable[[TrainEvent], Any] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> BreakForMakePipeline:
        """Run break (content, style) and make; datasets yield {"pixel_values", "prompt"} items.

        With `run_dir`, finished break runs are kept in <run_dir>/stages/ and reused by a later call."""
        # 1. Check inputs.
        for label, dataset in [
            ("content", content),
            ("style", style),
            *[("aux style", d) for d in aux_styles],
            *[("aux content", d) for d in aux_contents],
        ]:
            if len(dataset) == 0:
                raise UserError(f"the {label} dataset is empty")
        for field in ("content_factor", "mcp_loss", "partner_noise", "make_optimizer", "make_init"):
            allowed = dataclasses.fields(BreakForMakeConfig)
            choices = next(f.metadata["choices"] for f in allowed if f.name == field)
            if getattr(self.config, field) not in choices:
                raise UserError(
                    f"{field} must be one of {', '.join(map(repr, choices))}, got {getattr(self.config, field)!r}"
                )
        if self.handle is not None and set(self.handle.adapter_names) & {"content", "style", "joint"}:
            raise UserError("this pipeline's denoiser already has B4M adapters; load a fresh base model to train again")
        emit = on_event or (lambda event: None)
        run_dir = Path(run_dir) if run_dir is not None else None
        self._should_stop = should_stop or stop_file_exists(run_dir)
        self._run_dir = run_dir
        for module in family_of(self.pipe).frozen_modules(self.pipe):
            module.requires_grad_(False)
        plp = PlpConfig(
            targets=self.config.targets,
            r=self.config.rank,
            seed=self.config.seed,
            centered=self.config.centered,
            basis_rows=self.config.basis_rows,
            orthogonal_init=SQUARE_QKV if self.config.orthogonal_init == "released" else True,
        )
        torch.manual_seed(
            self.config.seed
        )  # PLP's learnable D is drawn from its own seeded generator; this covers the rest
        self._noise = training_scheduler(self.pipe)
        self._encoded = self._encode_once([content, style, *aux_styles, *aux_contents])

        content_main, style_main = (DOWN, UP) if self.config.content_factor == "down" else (UP, DOWN)
        # 2. Break: content run (main D on content, partner B on other styles).
        self._break_or_load("content", plp, content, list(aux_styles), main=content_main, partner=style_main, emit=emit)
        # 3. Break: style run (main B on style, partner D on other contents).
        self._break_or_load("style", plp, style, list(aux_contents), main=style_main, partner=content_main, emit=emit)
        # 4. Make: pair style's B with content's D (D_0 again where the released code re-initialises)
        #    and fine-tune both on both sets.
        reinit = released_reinit_layers(self.handle, "content") if self.config.make_init == "released" else ()
        make_joint(
            self.handle,
            content="content",
            style="style",
            name="joint",
            content_factor=self.config.content_factor,
            initial_down_in=reinit,
        )
        self._make(content, style, emit)
        self._guard("make", self.config.make_steps).check_finite(self.handle, self.config.make_steps)
        if run_dir is not None:
            self.save(Path(run_dir) / "b4m")
        return self

    # -- stages -----------------------------------------------------------------------------
    def _break_or_load(
        self, name: str, plp: PlpConfig, main_data, partner_sets: list, main: str, partner: str, emit
    ) -> None:
        """One break run, or its saved result when an earlier call with this run_dir finished it."""
        stage = self._run_dir / "stages" / name if self._run_dir is not None else None
        if stage is not None and stage.is_dir():
            load(self.model, stage, name=name)
            emit(TrainEvent(f"break-{name}", self.config.break_steps, self.config.break_steps, path=str(stage)))
            return
        self._break(name, plp, main_data, partner_sets, main, partner, emit)
        if stage is not None:  # a temporary folder renamed into place: the stage exists whole or not at all
            self._guard(f"break-{name}", self.config.break_steps).check_finite(
                self.handle, self.config.break_steps, [name]
            )
            partial = stage.with_name(f".{name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            self.handle.save(partial, name=name)
            os.replace(partial, stage)

    def _stop_if_requested(self, stage: str, step: int, total: int) -> None:
        if stop_requested(self._should_stop, None):  # the STOP file, or SIGINT/SIGTERM under catch_stop_signals
            serve_stop(  # removes the STOP file (served; a resume must not stop again), raises StopRequested
                self._run_dir,
                None,
                step,
                total,
                f"stopped on request in {stage} at step {step} of {total}; the finished break runs "
                "are kept and a resume starts from the stage in progress",
            )

    def _break(self, name: str, plp: PlpConfig, main_data, partner_sets: list, main: str, partner: str, emit) -> None:
        config = self.config
        if self.handle is None:
            attach(self.model, plp, name=name)
        else:
            self.handle.add(plp, name=name)
        handle = self.handle
        for other in handle.adapter_names:
            (handle.enable if other == name else handle.disable)(other)
        handle.set_trainable(name)
        main_params = [p for n, p in handle.named_trainable_parameters() if n.endswith(main)]
        partner_params = [p for n, p in handle.named_trainable_parameters() if n.endswith(partner)]
        main_opt = torch.optim.AdamW(main_params, lr=config.main_lr, weight_decay=config.weight_decay)
        partner_opt = torch.optim.AdamW(
            partner_params, lr=config.main_lr * config.partner_lr_ratio, weight_decay=config.weight_decay
        )
        self.model.train()
        guard = self._guard(f"break-{name}", config.break_steps, emit)
        in_step_loop(True)  # a stop signal now ends the stage after the step in progress (see _stop_if_requested)
        for step in range(config.break_steps):
            generator = step_generator(config.seed, step)
            loss = self._loss(main_data, config.seed, step, generator)
            partner_loss = None
            if partner_sets and config.mcp_loss == "released":
                partner_loss, norms = self._released_break_step(
                    loss, partner_sets, step, generator, (main_params, main_opt), (partner_params, partner_opt)
                )
            elif partner_sets and config.mcp_loss == "shared":  # one loss for both factors, each at its own lr
                partner_loss = self._partner_loss(partner_sets, step, generator)
                norms = self._step(loss + partner_loss, [(main_params, main_opt), (partner_params, partner_opt)])
            else:  # each factor its own loss (with K = 0 the partner does not train)
                norms = self._step(loss, [(main_params, main_opt)])
                if partner_sets:  # after the main step: the partner's loss sees the updated main factor
                    partner_loss = self._partner_loss(partner_sets, step, generator)
                    norms += self._step(partner_loss, [(partner_params, partner_opt)])
            main_loss = _check_step(guard, step + 1, loss, partner_loss, norms)
            emit(TrainEvent(f"break-{name}", step + 1, config.break_steps, loss=main_loss, lr=config.main_lr))
            if step + 1 < config.break_steps:
                self._stop_if_requested(f"break-{name}", step + 1, config.break_steps)

    def _partner_loss(self, partner_sets: list, step: int, generator: torch.Generator) -> torch.Tensor:
        """The mean diffusion loss over the other concepts, each with its own prompts. With
        partner_noise="shared" every set draws from a generator in the state the main batch's started
        from, so (at equal batch shapes) it gets the main batch's noise and timesteps."""
        shared = self.config.partner_noise == "shared"
        losses = [
            self._loss(
                data, self.config.seed + 1 + k, step, step_generator(self.config.seed, step) if shared else generator
            )
            for k, data in enumerate(partner_sets)
        ]
        return sum(losses) / len(partner_sets)

    def _released_break_step(self, loss, partner_sets: list, step: int, generator, main, partner) -> tuple:
        """One break step as the released code's updates run (mcp_loss="released"): the main factor
        steps on the main loss plus the partner gradient the previous step left on it; the partner
        loss, computed after that step, and the main loss step the partner factor. Returns the
        partner loss and the two groups' gradient norms."""
        (main_params, main_opt), (partner_params, partner_opt) = main, partner
        grads = torch.autograd.grad(loss, main_params + partner_params)
        main_grads, partner_from_main = grads[: len(main_params)], grads[len(main_params) :]
        carried = self._carried if step > 0 else [torch.zeros_like(g) for g in main_grads]
        main_norm = self._apply([g + c for g, c in zip(main_grads, carried)], main_params, main_opt)
        partner_loss = self._partner_loss(partner_sets, step, generator)
        grads = torch.autograd.grad(partner_loss, partner_params + main_params)
        partner_grads, self._carried = grads[: len(partner_params)], list(grads[len(partner_params) :])
        partner_norm = self._apply(
            [a + b for a, b in zip(partner_from_main, partner_grads)], partner_params, partner_opt
        )
        return partner_loss, [n for n in (main_norm, partner_norm) if n is not None]

    def _apply(
        self,
        grads: Sequence[torch.Tensor],
        params: list,
        optimizer: torch.optim.Optimizer,
        max_norm: float | None = None,
    ) -> torch.Tensor | None:
        """Clip `grads` as one group, step `optimizer` on them; returns their norm before clipping."""
        grads, norm = _clipped(grads, self.config.max_grad_norm if max_norm is None else max_norm)
        for parameter, grad in zip(params, grads):
            parameter.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _encode_once(self, datasets: Sequence) -> dict[int, StepCache]:
        """The VAE posteriors of every image of each set whose pixels are the same every epoch (center
        crops), by the set's id; none with encode_once off. The encoders stay where they are."""
        if not self.config.encode_once:
            return {}
        device = self.model.device
        return {
            id(data): StepCache.build(
                self.pipe,
                data,
                text=False,
                latents=True,
                batch_size=self.config.batch_size,
                device=device,
                offload=False,
            )
            for data in datasets
            if deterministic_pixels(data)
        }

    def _loss(self, data, seed: int, step: int, generator: torch.Generator) -> torch.Tensor:
        """The diffusion loss of step `step`'s batch of `data` (an epoch-wise order from `seed`)."""
        batch = sample_batch(data, self.config.batch_size, seed, step)
        cache = self._encoded.get(id(data))
        return diffusion_loss(
            self.pipe, self.model, batch, generator, self.model.device, torch.float32, self._noise, cache=cache
        )

    def _make(self, content, style, emit) -> None:
        config, handle = self.config, self.handle
        params = handle.trainable_parameters()
        named = handle.named_trainable_parameters()
        up_params = [p for n, p in named if n.endswith(UP)]
        down_params = [p for n, p in handle.named_trainable_parameters() if n.endswith(DOWN)]
        optimizer = torch.optim.AdamW(params, lr=config.make_lr, weight_decay=config.weight_decay)
        optimizers = [  # the released make: one AdamW for the up factors, one for the down factors
            torch.optim.AdamW(group, lr=config.make_lr, weight_decay=config.weight_decay)
            for group in (up_params, down_params)
        ]
        guard = self._guard("make", config.make_steps, emit)
        in_step_loop(True)
        for step in range(config.make_steps):
            # One noise draw for both halves of the step (the released code: same noise and timestep).
            seed = config.seed + 10_000
            content_loss = self._loss(content, seed, step, step_generator(seed, step))
            style_loss = self._loss(style, seed, step, step_generator(seed, step))
            loss = content_loss + style_loss
            if config.make_optimizer == "released":
                norms = self._released_make_step(style_loss, content_loss, up_params, down_params, optimizers)
            else:
                norms = self._step(loss, [(params, optimizer)], precondition="joint" if config.riemannian else None)
            loss_value = _check_step(guard, step + 1, loss, None, norms)
            emit(TrainEvent("make", step + 1, config.make_steps, loss=loss_value, lr=config.make_lr))
            if step + 1 < config.make_steps:
                self._stop_if_requested("make", step + 1, config.make_steps)

    def _released_make_step(self, style_loss, content_loss, up_params, down_params, optimizers) -> list:
        """One make step as the released code's updates run (make_optimizer="released").

        Its loop backpropagates the style loss, clips the up factors' gradient, backpropagates the
        content loss, clips the down factors' gradient, steps an AdamW over the up factors and one over
        the down factors (each clearing its gradients), and then its Riemannian AdamW, which so finds
        every gradient zero: its Adam update is 0 and only its decoupled weight decay acts,
        p <- p - lr * wd * p on U and V (here on the learnable halves: A and C stay frozen).
        With `riemannian`, the clipped gradients are preconditioned before the AdamWs step."""
        params, count = up_params + down_params, len(up_params)
        style_grads = torch.autograd.grad(style_loss, params)
        content_grads = torch.autograd.grad(content_loss, params)
        up_style, up_norm = _clipped(style_grads[:count], self.config.max_grad_norm)
        up_grads = [a + b for a, b in zip(up_style, content_grads[:count])]  # clipped before the content loss
        down_grads, down_norm = _clipped(
            [a + b for a, b in zip(style_grads[count:], content_grads[count:])], self.config.max_grad_norm
        )
        if self.config.riemannian:
            for parameter, grad in zip(params, up_grads + down_grads):
                parameter.grad = grad
            precondition_gradients(self.handle, "joint", self.config.riemannian_delta)
            up_grads, down_grads = [p.grad for p in up_params], [p.grad for p in down_params]
        self._apply(up_grads, up_params, optimizers[0], max_norm=0)
        self._apply(down_grads, down_params, optimizers[1], max_norm=0)
        with torch.no_grad():  # the Riemannian AdamW's step on cleared gradients: its weight decay alone
            for parameter in params:
                parameter.mul_(1 - self.config.make_lr * self.config.weight_decay)
        return [n for n in (up_norm, down_norm) if n is not None]

    def _step(
        self,
        loss: torch.Tensor,
        groups: list[tuple[list[torch.nn.Parameter], torch.optim.Optimizer]],
        precondition: str | None = None,
    ) -> list[torch.Tensor]:
        """Gradient of `loss` for the groups' parameters only; nothing else receives (or keeps) a
        gradient. Each (parameters, optimizer) group is clipped and stepped on its own.
        `precondition`: the PLP adapter whose gradients get the Riemannian scaling first.
        Returns the groups' gradient norms (none without clipping), still on the device."""
        params = [parameter for group, _ in groups for parameter in group]
        grads = torch.autograd.grad(loss, params)
        for parameter, grad in zip(params, grads):
            parameter.grad = grad
        if precondition is not None:
            precondition_gradients(self.handle, precondition, self.config.riemannian_delta)
        norms = []
        for group, optimizer in groups:
            if self.config.max_grad_norm > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(group, self.config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return norms

    def _guard(self, stage: str, steps: int, emit=None) -> DivergenceGuard:
        """The divergence check of one stage (its loss, gradient norms, and its adapters before they are saved)."""
        lr_flag = "--make-lr" if stage == "make" else "--main-lr"
        learning_rate = self.config.make_lr if stage == "make" else self.config.main_lr
        hint = divergence_hint(learning_rate, self.config.max_grad_norm, lr_flag=lr_flag, scale_flag=None)
        return DivergenceGuard(steps, hint, emit, stage=stage)

    # -- compose ----------------------------------------------------------------------------
    def set_mix(self, content_weight: float = 1.0, style_weight: float = 1.0, adapter: str = "joint") -> None:
        """Scale the joint adapter's content factor D and style factor B (1, 1: as trained)."""
        handle = self.handle
        if handle is None or adapter not in handle.adapter_names:
            raise UserError(f"no {adapter!r} adapter yet; run the pipeline (break -> make) or load a saved one")
        if not (math.isfinite(content_weight) and math.isfinite(style_weight)):
            raise UserError(f"content and style weights must be finite numbers, got {content_weight}, {style_weight}")
        for other in handle.adapter_names:
            (handle.enable if other == adapter else handle.disable)(other)
        up_weight, down_weight = (
            (style_weight, content_weight) if self.config.content_factor == "down" else (content_weight, style_weight)
        )
        for _, wrapper in handle.wrappers(adapter):
            wrapper.adapters[adapter].set_factor_weights(up=up_weight, down=down_weight)

    def generate(
        self,
        prompts: Sequence[str],
        content_weight: float = 1.0,
        style_weight: float = 1.0,
        adapter: str = "joint",
        **options,
    ) -> list:
        """Images of `prompts` with one adapter ("joint", or "content"/"style" alone)."""
        self.set_mix(content_weight, style_weight, adapter)
        return generate(self.pipe, prompts, **options)

    # -- save / load ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        for name in self.handle.adapter_names:
            self.handle.save(directory / name, name=name)
        write_json(
            directory / "b4m.json", {"config": dataclasses.asdict(self.config), "adapters": self.handle.adapter_names}
        )
        return directory

    @classmethod
    def from_pretrained(cls, pipe, directory: str | os.PathLike) -> BreakForMakePipeline:
        directory = Path(directory)
        record = read_json(directory / "b4m.json")
        b4m = cls(pipe, BreakForMakeConfig(**upgrade_config(record["config"])))
        for name in record["adapters"]:
            load(family_of(pipe).denoiser(pipe), directory / name, name=name)
        return b4m
