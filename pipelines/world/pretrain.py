"""The recipe that makes the embedded base models shipped in assets/ (`studio pretrain-base` runs it).

Stages (each can run alone; all are seeded and deterministic given the device; they run in this order):
  sets    render the novel and auxiliary image sets (PNG + metadata.jsonl) -> <out>/sets/<name>/
  lm      fit the tiny Llama on the text world, write its task and probe data -> <out>/tiny-lm/
  sd      render the pretraining world, fit the VAE (L1 + MSE + tiny KL), measure the latent scale,
          then fit UNet + CLIP text encoder jointly (epsilon loss, 10% caption dropout for
          classifier-free guidance, EMA weights), save a StableDiffusionPipeline -> <out>/tiny-sd/
          and check prompt following with the judge on held-out prompts (if a judge fitted to
          this VAE exists; else the judges stage runs the check)
  judges  render judge pictures, fit the four-head judge CNN on them and on their round trips
          through the tiny SD's VAE, so it reads what the generator can draw -> <out>/judges/;
          then check prompt following of <out>/tiny-sd with it.

    pretrain(SCALES["toy"], Path("assets-toy"), ["sets", "lm"], device="cpu", workers=2)

Every stage writes a training.json next to its weights with the recipe, the steps actually run,
losses, timings and the device. Every fit is `train_loop`: AdamW with the training kit's warm-up +
cosine schedule (pipelines.training.lr_factor) decaying to 10%.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import UserError
from pipelines.training import lr_factor

if TYPE_CHECKING:  # torch is imported inside the stages: importing the recipe must stay light
    import torch

# Run in this order: the judges are fitted to the VAE that the sd stage trains.
STAGES = ("sets", "lm", "sd", "judges", "trusted-judges")


@dataclass
class Recipe:
    """Every number of the recipe; `--set key=value` overrides one (unknown keys are errors)."""

    seed: int = 0
    image_size: int = 64
    # judges
    judge_images: int = 40_000
    judge_steps: int = 2_000
    judge_batch: int = 256
    judge_lr: float = 2e-3
    # The judge also trains on round trips of its pictures through this VAE (a tiny-sd folder or its
    # vae/ folder; "" = <out>/tiny-sd), with this probability per picture.
    judge_vae: str = ""
    judge_vae_probability: float = 0.5
    judge_check_images: int = 2_000  # held-out renders (and their VAE round trips) the accuracy is measured on
    # trusted-judges: shapeless pictures (noise, decoded random latents) added as content "none"
    judge_shapeless: int = 4_000
    # sd: VAE, then UNet + text encoder on the VAE's latents
    sd_images: int = 200_000
    # A tiny-sd folder to continue from instead of a fresh init ("same": the one in --out);
    # with vae_steps=0 its VAE and latent scale are kept.
    sd_init: str = ""
    vae_steps: int = 1_107
    vae_batch: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_max_minutes: float = 0.0  # 0 = no time budget; else the step plan shrinks to fit (recorded)
    sd_steps: int = 2_276
    sd_batch: int = 512
    sd_lr: float = 5e-4
    sd_warmup: int = 300
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    sd_max_minutes: float = 0.0
    sanity_prompts: int = 64
    # lm
    lm_documents: int = 60_000
    lm_steps: int = 3_000
    lm_batch: int = 64
    lm_block: int = 128
    lm_lr: float = 2e-3
    lm_max_minutes: float = 0.0
    task_train: int = 4_000
    task_test: int = 400
    heldout_documents: int = 500
    # sets
    set_size: int = 16


SCALES: dict[str, Recipe] = {
    # Phase 1 of the shipped models (judges, lm, sd from scratch): about 8 minutes on one H100.
    "full": Recipe(),
    # Phase 2 (sd only): continue phase 1's UNet + text encoder with 3x larger batches. The tiny UNet
    # is launch-bound on an H100 (98 ms/step at batch 512, 128 ms at 1536), so big batches are
    # nearly free; phase 1 alone reached 0.41 judged prompt accuracy, phase 2 lifts it to ~0.8.
    "full-phase2": Recipe(
        sd_init="same",
        vae_steps=0,
        sd_images=100_000,
        sd_batch=1536,
        sd_lr=3e-4,
        sd_warmup=50,
        sd_steps=823,
        ema_decay=0.995,
    ),
    # The same code path at a size a CPU finishes in about a minute (for tests and dry runs).
    "toy": Recipe(
        judge_images=512,
        judge_steps=20,
        judge_batch=32,
        judge_check_images=64,
        judge_shapeless=32,
        sd_images=256,
        vae_steps=4,
        vae_batch=8,
        sd_steps=6,
        sd_batch=8,
        sd_warmup=2,
        sanity_prompts=4,
        lm_documents=64,
        lm_steps=4,
        lm_batch=4,
        task_train=16,
        task_test=8,
        heldout_documents=8,
        set_size=2,
    ),
}


def pretrain(recipe: Recipe, out: Path, stages: Sequence[str], device: str, workers: int) -> None:
    """Run `stages` of the recipe (in STAGES order, whatever order they are given in) into `out`."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(STAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    for stage in [s for s in STAGES if s in stages]:
        started = time.time()
        print(f"[pretrain-base] stage {stage} on {device}", flush=True)
        stage_functions = {
            "sets": pretrain_sets,
            "judges": pretrain_judges,
            "trusted-judges": pretrain_trusted_judges,
            "sd": pretrain_sd,
            "lm": pretrain_lm,
        }
        stage_functions[stage](recipe, out, device, workers)
        print(f"[pretrain-base] stage {stage} done in {time.time() - started:.0f}s", flush=True)


def _environment(device: str) -> dict:
    import torch

    return {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _write_record(folder: Path, record: dict) -> None:
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Shared pieces: parallel rendering, one training loop
# ---------------------------------------------------------------------------------------------


def _render_chunk(job: tuple[str, int, int, int, int]):
    from pipelines.world.image import render_stream

    kind, seed, count, size, start = job
    return render_stream(kind, seed, count, size, start)


def render_parallel(kind: str, seed: int, count: int, size: int, workers: int):
    """Pictures 0..count-1 of stream (kind, seed), rendered in `workers` processes: (uint8 array, scenes)."""
    import numpy as np

    from pipelines.world.image import render_stream

    chunk = 2_000
    jobs = [(kind, seed, min(chunk, count - start), size, start) for start in range(0, count, chunk)]
    if workers <= 1 or len(jobs) == 1:
        return render_stream(kind, seed, count, size)
    # fork keeps start-up cheap; every picture's RNG depends only on (seed, index), so the result is
    # the same for any number of workers.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


def train_loop(
    name: str,
    step_fn: Callable[[int], torch.Tensor],
    parameters,
    lr: float,
    steps: int,
    warmup: int,
    max_minutes: float,
    weight_decay: float = 0.0,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """AdamW with linear warm-up and cosine decay to 10%, for `steps` or until `max_minutes`.

    If the first 60 steps show that `steps` cannot finish in `max_minutes`, the plan shrinks to
    what fits (once, early, so the cosine schedule still runs to its end); the record says so.
    """
    import torch

    if steps < 1:
        raise UserError(f"{name}: the recipe asks for {steps} steps; give at least 1 (--set {name}_steps=N)")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    plan = {"steps": steps}

    def factor(step: int) -> float:  # the kit's warm-up + cosine, to 10%, over the (possibly cut) plan
        return lr_factor(step, "cosine", warmup, plan["steps"], floor=0.1)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses, started, step = [], time.time(), 0
    while step < plan["steps"]:
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(step)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step()
        losses.append(loss)
        step += 1
        if step == 10:  # the first steps pay for kernel selection and warm-up: time after them
            warm_start = time.time()
        if step == 60 and max_minutes > 0:
            seconds_per_step = (time.time() - warm_start) / 50
            affordable = step + int((max_minutes * 60 - (time.time() - started)) / seconds_per_step)
            if affordable < plan["steps"]:
                affordable = max(affordable, step)
                print(
                    f"[{name}] {seconds_per_step * 1000:.0f} ms/step: plan cut from {plan['steps']} "
                    f"to {affordable} steps",
                    flush=True,
                )
                plan["steps"] = affordable
        if step % 250 == 0 or step == plan["steps"]:
            # Losses stay on the device between reports: no host sync per step.
            recent = float(torch.stack(losses[-250:]).float().mean())
            print(f"[{name}] step {step}/{plan['steps']} loss {recent:.4f} ({time.time() - started:.0f}s)", flush=True)
    history = torch.stack(losses).float().cpu().tolist()
    curve = [round(sum(history[i : i + 100]) / len(history[i : i + 100]), 5) for i in range(0, len(history), 100)]
    return {
        "steps_planned": steps,
        "steps_run": step,
        "cut_by_time_budget": step < steps,
        "seconds": round(time.time() - started, 1),
        "loss_every_100_steps": curve,
    }


# ---------------------------------------------------------------------------------------------
# Stage: sets
# ---------------------------------------------------------------------------------------------


def pretrain_sets(recipe: Recipe, out: Path, device: str, workers: int) -> None:
    from pipelines.world.image import concept_sets, write_concept_set

    for name, spec in concept_sets().items():
        folder = write_concept_set(out / "sets" / name, name, recipe.set_size, recipe.seed, recipe.image_size)
        print(f"[sets] {name} ({spec['role']} {spec['kind']}): {recipe.set_size} pictures -> {folder}", flush=True)


# ---------------------------------------------------------------------------------------------
# Stage: judges
# ---------------------------------------------------------------------------------------------


def pretrain_judges(recipe: Recipe, out: Path, device: str, workers: int) -> None:
    """The shipped judges (assets/judges): the world's contents and styles, fitted to the tiny SD's VAE."""
    fit_judges(recipe, out, device, workers, kind="judge", folder_name="judges", trusted=False)


def pretrain_trusted_judges(recipe: Recipe, out: Path, device: str, workers: int) -> None:
    """The composition benchmark's judges (assets/trusted-judges): a "none" content (shapeless renders,
    noise, decoded random latents), the leaky world's styles and appearance, temperatures calibrated
    on held-out VAE round trips."""
    fit_judges(recipe, out, device, workers, kind="trusted-judge", folder_name="trusted-judges", trusted=True)


def fit_judges(recipe: Recipe, out: Path, device: str, workers: int, kind: str, folder_name: str, trusted: bool):
    from pipelines.metrics import (
        HEADS,
        TRUSTED_HEADS,
        calibrate_temperatures,
        label_accuracy,
        save_judge,
        shapeless_pictures,
        train_judge,
        vae_round_trip,
    )

    vae_folder = _judge_vae_folder(recipe, out)
    vae = _load_vae(vae_folder).to(device)
    fingerprint = vae_fingerprint(vae)
    # Training pictures come from stream seed; the accuracy check uses a disjoint stream.
    images, scenes = render_parallel(kind, recipe.seed, recipe.judge_images, recipe.image_size, workers)
    shapeless = shapeless_pictures(recipe.judge_shapeless, recipe.image_size, recipe.seed, vae) if trusted else None
    started = time.time()
    judge, log = train_judge(
        images,
        scenes,
        recipe.judge_steps,
        recipe.judge_batch,
        recipe.judge_lr,
        seed=recipe.seed,
        device=device,
        vae=vae,
        vae_probability=recipe.judge_vae_probability,
        heads=TRUSTED_HEADS if trusted else HEADS,
        shapeless=shapeless,
    )
    seconds = round(time.time() - started, 1)
    check_images, check_scenes = render_parallel(
        kind, recipe.seed + 10_000, recipe.judge_check_images, recipe.image_size, workers
    )
    check_trips = vae_round_trip(vae, check_images)
    record: dict = {}
    if trusted:
        # Temperatures from a third stream's round trips (what generated pictures look like), so the
        # accuracy check below stays held out from the calibration too.
        calibration_images, calibration_scenes = render_parallel(
            kind, recipe.seed + 20_000, recipe.judge_check_images, recipe.image_size, workers
        )
        record["temperatures"] = calibrate_temperatures(
            judge, vae_round_trip(vae, calibration_images), calibration_scenes
        )
    accuracy = label_accuracy(judge, check_images, check_scenes)
    accuracy_after_vae = label_accuracy(judge, check_trips, check_scenes)
    print(
        f"[{folder_name}] accuracy on held-out renders: {accuracy}; on their VAE round trips: {accuracy_after_vae}",
        flush=True,
    )
    folder = save_judge(judge.cpu(), out / folder_name, {"vae_fingerprint": fingerprint})
    record = {
        "recipe": dataclasses.asdict(recipe),
        "vae": {"folder": str(vae_folder), "fingerprint": fingerprint},
        "seconds": seconds,
        "loss_log": log,
        "heldout_accuracy": accuracy,
        "heldout_accuracy_after_vae": accuracy_after_vae,
        **record,
        **_environment(device),
    }
    # The sd stage could not check prompt following with a judge fitted to another VAE (or none):
    # check the tiny SD in --out now, if this judge reads its VAE.
    sd_folder = out / "tiny-sd"
    if not trusted and (sd_folder / "model_index.json").is_file():
        from pipelines.base import load_base

        pipeline = load_base(sd_folder, device=device)
        if vae_fingerprint(pipeline.vae) == fingerprint:
            record["sd_sanity"] = sanity_check(pipeline, recipe, folder, device)
    _write_record(folder, record)


def _judge_vae_folder(recipe: Recipe, out: Path) -> Path:
    folder = Path(recipe.judge_vae) if recipe.judge_vae else out / "tiny-sd"
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise UserError(
            f"the judges stage fits the judge to the tiny SD's VAE, and there is none at {folder}: "
            "run the sd stage first (--stages sd,judges), or name a tiny-sd folder with "
            "--set judge_vae=FOLDER (e.g. assets/tiny-sd)"
        )
    return folder


def _load_vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval().requires_grad_(False)


def vae_fingerprint(vae) -> str:
    """A short hash of a VAE's weights: which VAE a judge was fitted to."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Stage: sd (VAE -> latent scale -> UNet + text encoder -> prompt-following check)
# ---------------------------------------------------------------------------------------------


def pretrain_sd(recipe: Recipe, out: Path, device: str, workers: int) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from pipelines.world import tiny_sd

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    folder = out / "tiny-sd"
    folder.mkdir(parents=True, exist_ok=True)
    record: dict = {"recipe": dataclasses.asdict(recipe), **_environment(device)}

    # 1. The pretraining world: pictures and captions (held-out compositions excluded).
    images, scenes = render_parallel("pretraining", recipe.seed, recipe.sd_images, recipe.image_size, workers)
    pictures = torch.from_numpy(images).to(device)  # (N, 64, 64, 3) uint8
    num_pictures = len(pictures)
    if recipe.sd_init:
        init_folder = folder if recipe.sd_init == "same" else Path(recipe.sd_init)
        if not (init_folder / "model_index.json").is_file():
            raise UserError(f"sd_init: no tiny-sd pipeline at {init_folder}; run the full scale first")
        tokenizer, text_encoder, vae, unet = tiny_sd.load_parts(init_folder)
        previous = init_folder / "training.json"
        record["continued_from"] = json.loads(previous.read_text()) if previous.is_file() else str(init_folder)
    else:
        tokenizer, text_encoder, vae, unet = tiny_sd.build_models(folder / "tokenizer", recipe.seed)
    text_encoder, vae, unet = text_encoder.to(device), vae.to(device), unet.to(device)

    def pixel_batch(index: torch.Tensor) -> torch.Tensor:
        return pictures[index].permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, 64, 64) in [-1, 1]

    def random_index(batch: int) -> torch.Tensor:
        return torch.randint(num_pictures, (batch,), device=device, generator=generator)

    # 2. VAE: reconstruction (L1 + MSE) with a tiny KL so the latent space stays smooth.
    def vae_step(step: int) -> float:
        x = pixel_batch(random_index(recipe.vae_batch))
        with autocast:
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        reconstruction = reconstruction.float()
        loss = (
            F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + recipe.vae_kl_weight * posterior.kl().mean()
        )
        loss.backward()
        return loss.detach()

    if recipe.vae_steps > 0:
        vae.train()
        record["vae"] = train_loop(
            "vae", vae_step, vae.parameters(), recipe.vae_lr, recipe.vae_steps, 100, recipe.vae_max_minutes
        )
    vae.eval().requires_grad_(False)

    # 3. Latents of every picture, and the scale that gives them unit variance (SD's scaling_factor).
    means, stds = [], []
    with torch.no_grad(), autocast:
        for start in range(0, num_pictures, 1024):
            dist = vae.encode(
                pixel_batch(torch.arange(start, min(start + 1024, num_pictures), device=device))
            ).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    latent_mean, latent_std = torch.cat(means), torch.cat(stds)  # (N, 4, 16, 16)
    if recipe.vae_steps > 0:
        vae.register_to_config(scaling_factor=float(1 / latent_mean.std()))
    scaling_factor = vae.config.scaling_factor  # a continued UNet keeps the scale it was trained with
    with torch.no_grad(), autocast:
        check = pixel_batch(torch.arange(min(512, num_pictures), device=device))
        record["vae_reconstruction_mse"] = round(
            F.mse_loss(vae.decode(vae.encode(check).latent_dist.mean).sample.float(), check).item(), 5
        )
    record["scaling_factor"] = scaling_factor
    print(
        f"[sd] latent scaling factor {scaling_factor:.4f}, reconstruction mse {record['vae_reconstruction_mse']}",
        flush=True,
    )

    # 4. UNet + text encoder, jointly, on the standard epsilon-prediction loss.
    captions = [scene.caption() for scene in scenes]
    token_ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    empty_ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)
    noise_scheduler = DDPMScheduler(**tiny_sd.scheduler_config())
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    trained = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in trained]

    def sd_step(step: int) -> float:
        index = random_index(recipe.sd_batch)
        latents = (
            latent_mean[index]
            + latent_std[index] * torch.randn(latent_mean[index].shape, device=device, generator=generator)
        ) * scaling_factor
        noise = torch.randn(latents.shape, device=device, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(index),), device=device, generator=generator
        )
        alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        # Caption dropout teaches the unconditional branch that classifier-free guidance needs.
        drop = torch.rand(len(index), device=device, generator=generator) < recipe.caption_dropout
        ids = torch.where(drop[:, None], empty_ids, token_ids[index])
        with autocast:
            context = text_encoder(ids)[0]
            prediction = unet(noisy, timesteps, context).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        return loss.detach()

    @torch.no_grad()
    def update_ema() -> None:
        torch._foreach_lerp_(ema, [p.detach() for p in trained], 1 - recipe.ema_decay)

    unet.train()
    text_encoder.train()
    record["unet_text_encoder"] = train_loop(
        "sd",
        sd_step,
        trained,
        recipe.sd_lr,
        recipe.sd_steps,
        recipe.sd_warmup,
        recipe.sd_max_minutes,
        weight_decay=1e-2,
        on_step=update_ema,
    )
    # Ship the EMA weights: smoother than the last step's.
    with torch.no_grad():
        for parameter, average in zip(trained, ema):
            parameter.copy_(average)

    # 5. Save in diffusers format, then check prompt following on held-out compositions.
    pipeline = tiny_sd.assemble_pipeline(tokenizer, text_encoder.eval(), vae, unet.eval())
    record["sanity"] = sanity_check(pipeline, recipe, out / "judges", device)
    pipeline.to("cpu").save_pretrained(folder)
    _write_record(folder, record)


def sanity_check(pipeline, recipe: Recipe, judge_folder: Path, device: str) -> dict:
    """Judge-measured prompt accuracy on held-out prompts at a few guidance scales (2 seeds each)."""
    import torch

    from pipelines.metrics import load_judge, prompt_matches
    from pipelines.world.image import heldout_prompt_scenes

    if not (judge_folder / "judge.json").is_file():
        return {"skipped": f"no judge at {judge_folder} yet; the judges stage runs this check"}
    # A judge fitted to another VAE misreads this one's colours: the judges stage refits it and checks.
    fitted_to = json.loads((judge_folder / "judge.json").read_text()).get("vae_fingerprint")
    if fitted_to is not None and fitted_to != vae_fingerprint(pipeline.vae):
        return {
            "skipped": f"the judge at {judge_folder} was fitted to another VAE; the judges stage refits it "
            "and runs this check"
        }
    judge = load_judge(judge_folder, device)
    scenes = heldout_prompt_scenes(recipe.sanity_prompts) * 2
    pipeline.set_progress_bar_config(disable=True)
    results = {}
    for guidance in (3.0, 5.0, 7.5):
        generator = torch.Generator(device=device).manual_seed(recipe.seed)
        pictures = pipeline(
            [s.caption() for s in scenes],
            num_inference_steps=20,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
        ).images
        matches = prompt_matches(judge, (pictures * 255).round().astype("uint8"), scenes)
        results[f"guidance_{guidance}"] = round(sum(matches) / len(matches), 4)
    print(f"[sd] held-out prompt accuracy (content + colour, judged): {results}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Stage: lm
# ---------------------------------------------------------------------------------------------


def pretrain_lm(recipe: Recipe, out: Path, device: str, workers: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from pipelines.world import text as world

    folder = out / "tiny-lm"
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    record: dict = {"recipe": dataclasses.asdict(recipe), **_environment(device)}
    tokenizer = world.build_tokenizer()
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(
        world.lm_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ).to(device)

    # 1. Pack the pretraining documents (each <s> ... </s>) into fixed blocks.
    documents = world.pretraining_text(recipe.seed, recipe.lm_documents)
    stream = [token for ids in tokenizer(documents).input_ids for token in ids + [tokenizer.eos_token_id]]
    usable = len(stream) // recipe.lm_block * recipe.lm_block
    blocks = torch.tensor(stream[:usable], device=device).view(-1, recipe.lm_block)  # (num_blocks, block)
    record["pretraining_tokens"] = usable
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def lm_step(step: int) -> float:
        batch = blocks[torch.randint(len(blocks), (recipe.lm_batch,), device=device, generator=generator)]
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss.detach()

    model.train()
    record["training"] = train_loop(
        "lm",
        lm_step,
        model.parameters(),
        recipe.lm_lr,
        recipe.lm_steps,
        min(200, recipe.lm_steps // 10 + 1),
        recipe.lm_max_minutes,
        weight_decay=0.1,
    )
    model.eval()

    # 2. Held-out text, the downstream task (never in pretraining) and the knowledge probe.
    heldout = world.pretraining_text(world.HELDOUT_SEED, recipe.heldout_documents)
    (data / "heldout.txt").write_text("\n".join(heldout) + "\n")
    files = {
        "task_add_train.jsonl": world.addition_task("train", recipe.task_train),
        "task_add_test.jsonl": world.addition_task("test", recipe.task_test),
        "knowledge_probe.jsonl": world.knowledge_probe(),
    }
    for name, rows in files.items():
        (data / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    record["heldout_ppl"] = round(world.perplexity(model, tokenizer, heldout), 4)
    record["knowledge_accuracy"] = round(
        world.multiple_choice_accuracy(model, tokenizer, files["knowledge_probe.jsonl"]), 4
    )
    record["task_add_test_accuracy_before_finetuning"] = round(
        world.multiple_choice_accuracy(model, tokenizer, files["task_add_test.jsonl"], prompt_key="instruction"), 4
    )
    print(
        f"[lm] held-out ppl {record['heldout_ppl']}, knowledge probe {record['knowledge_accuracy']}, "
        f"addition task (zero-shot) {record['task_add_test_accuracy_before_finetuning']}",
        flush=True,
    )
    write_preference_files(model, tokenizer, data)
    model.cpu().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_record(folder, record)


def write_preference_files(model, tokenizer, data: Path) -> None:
    """preference_add_{train,test}.jsonl: the first task rows of each split, the right sum chosen and the
    pretrained model's likeliest wrong sum rejected (`world.model_mistakes`). Rerun on the shipped model:
    python -c "from pipelines.base import load_embedded_lm, EMBEDDED_LM; from pipelines.world.pretrain import \
    write_preference_files as w; m, t = load_embedded_lm(); w(m, t, EMBEDDED_LM / 'data')"."""
    from pipelines.world import text as world

    for split, count in world.PREFERENCE_COUNTS.items():
        rows = world.addition_task(split, count)
        pairs = world.addition_preferences(split, count, world.model_mistakes(model, tokenizer, rows))
        (data / f"preference_add_{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
