"""`studio train-style` and `studio train-content`: train an adapter on a folder of images.

With no arguments, `studio train-style` is the embedded demo: it trains a style adapter on the
shipped novel "neon" style set (never seen in pretraining), then draws the world's shapes in that
style and writes a sample grid, on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from peft_core import AdapterConfig
from pipelines.base import ASSETS, base_dtype_option, quantize_denoiser_nf4, torch_dtype
from pipelines.errors import UserError
from pipelines.families import base_option, family_of, family_option, family_override, resolution_option
from pipelines.options import build, option
from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig
from studio.adapters import AdapterOptions, adapter_config, adapter_section, wrappable_targets
from studio.options import Section, resolve_options, resume_flags
from studio.preflight import check_training_device, device_problem, run_record, writable_folder

# Attention alone is too little capacity to change a rendering style on the tiny UNet (measured: after
# 300 steps only the background changed); adding the transformer blocks' projections and feed-forward
# and the ResNet convolutions learns dark backgrounds with glowing strokes in 600 CPU steps (~2.5 min).
# A method takes the ones it can wrap (PLP: the Linear ones; see studio.adapters.wrappable_targets).
DEFAULT_TARGETS = [*UNET_ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
DEFAULT_LEARNING_RATE = 3e-3

# What each kind trains on by default (the embedded demo) and how its prompts look.
KINDS = {
    "style": {
        "data": ASSETS / "sets" / "style-neon",
        "samples": ["a star in neon style", "a heart in neon style", "a circle in neon style", "a cross in neon style"],
        "steps": 600,
    },
    "content": {
        "data": ASSETS / "sets" / "content-moon",
        "samples": ["a moon", "a red moon", "a blue moon on a striped green background", "a yellow moon"],
        "steps": 600,
    },
}


@dataclass
class ImageRunOptions:
    """What to train on and where the run goes (top-level keys of the YAML)."""

    data: str | None = option(
        None, help="folder of images with captions (sidecar .txt or metadata.jsonl)", positional=True, ui=False
    )
    base: str = base_option()
    name: str | None = option(None, help="run name (default: <kind>-<data folder name>)", ui=False)
    runs_dir: str = option("runs", help="where run folders go", ui=False)
    family: str = family_option(ui=True)
    base_dtype: str = base_dtype_option()
    base_quantization: str = option(
        "none",
        help="nf4: the denoiser's Linear layers in 4 bits (bitsandbytes, CUDA), QLoRA-style; for methods that "
        "train on a quantized base (LoRA, PaCA, PLP, Compacter)",
        choices=("none", "nf4"),
        advanced=True,
        ui=False,
    )
    resume: str | None = option(
        None, help="continue an interrupted run from its last checkpoint", metavar="RUN_DIR", ui=False
    )
    init_adapter: str | None = option(
        None,
        help="start from this LoRA file (kohya or diffusers layout, made anywhere): its denoiser part is the "
        "trained LoRA (its own ranks); --method must be lora",
        metavar="FILE",
        ui=False,
    )
    template: str | None = option(None, help="prompt template, e.g. 'a photo of {trigger} {caption}'")
    trigger: str | None = option(None, help="trigger word the template uses")
    resolution: int | None = resolution_option()
    device: str | None = option(None, help="cpu or cuda (default: cuda if available)", ui=False, check=device_problem)


def sections(kind: str = "style") -> list[Section]:
    defaults = KINDS[kind]
    return [
        Section(None, ImageRunOptions, defaults={"data": str(defaults["data"])}),
        adapter_section("diffusion"),
        Section(
            "train",
            TrainConfig,
            title="training",
            defaults={
                "steps": defaults["steps"],
                "learning_rate": DEFAULT_LEARNING_RATE,
                "sample_prompts": defaults["samples"],
            },
        ),
    ]


def resolve(args: argparse.Namespace) -> dict:
    """Everything the run needs, from YAML < flags, validated before anything is written.

    "adapter" is the method's config, or its options where the targets depend on the model (the
    method's wrappable default targets), which `adapter_for_model` completes once the model is loaded."""
    options = resolve_options(args, sections(args.kind))
    run, adapter = options[None], options["adapter"]
    # Build the config now so a bad hyperparameter fails here; without --targets it is rebuilt on the model.
    checked = adapter_config(adapter, "diffusion", adapter.targets or ["<the model's default targets>"])
    return {
        "data": Path(run.data or KINDS[args.kind]["data"]),  # YAML `data:` left empty: the default
        "train": options["train"],
        "adapter": checked if adapter.targets or _trainer_targets(adapter) else adapter,
        "name": run.name,
        "runs_dir": run.runs_dir,
        **{
            key: getattr(run, key)
            for key in (
                "base",
                "family",
                "base_dtype",
                "base_quantization",
                "init_adapter",
                "template",
                "trigger",
                "resolution",
            )
        },
        "device": run.device,
    }


def _trainer_targets(adapter: AdapterOptions) -> bool:
    """Whether the method brings its own targets for this trainer (Compacter's placement)."""
    from studio.adapters import trainer_defaults

    return "targets" in trainer_defaults(adapter.method, "diffusion")


def adapter_for_model(adapter: AdapterConfig | AdapterOptions, pipe) -> AdapterConfig:
    """The adapter config, with the default targets this method can wrap in the pipeline's denoiser
    where none were given (SD: DEFAULT_TARGETS; the other families: their own, pipelines.families)."""
    if isinstance(adapter, AdapterConfig):
        return adapter
    family = family_of(pipe)
    defaults = DEFAULT_TARGETS if family.name == "sd" else list(family.default_targets)
    return adapter_config(adapter, "diffusion", wrappable_targets(family.denoiser(pipe), defaults, adapter.method))


def from_record(record: dict) -> dict:
    """The settings of a run folder's config.yaml (for --resume)."""
    from peft_core import config_from_dict

    return {
        "data": Path(record["data"]),
        "train": build(TrainConfig, dict(record["train"]), "the run's config"),
        "adapter": config_from_dict(record["adapter"]),
        "device": None,
        **{key: record.get(key) for key in ("base", "family", "init_adapter", "template", "trigger", "resolution")},
        "base_dtype": record.get("base_dtype", "float32"),
        "base_quantization": record.get("base_quantization", "none"),
    }


def run_name(kind: str, settings: dict) -> str:
    """--name, else <kind>-<data folder name> (the folder's name alone when it starts with the kind)."""
    data_name = settings["data"].name
    return settings["name"] or (data_name if data_name.startswith(kind) else f"{kind}-{data_name}")


# What --resume may change (kept in config.yaml, except the device); any other flag is refused by name.
RESUME_FLAGS = {"train": ("steps", "checkpoint_every", "sample_every"), None: ("device",)}


def apply_resume_flags(args: argparse.Namespace, run_folder, settings: dict) -> dict:
    """The flags given with --resume: --steps (train longer, or stop sooner; the LR schedule follows the
    new total), --checkpoint-every and --sample-every change the run (returned, for its config.yaml),
    --device this start; any other flag is a UserError naming it."""
    changes = resume_flags(args, sections(args.kind), RESUME_FLAGS)
    train = changes.get("train", {})
    if "steps" in train:
        run_folder.check_resume_steps(train["steps"])
    settings["train"] = dataclasses.replace(settings["train"], **train)
    settings["device"] = changes.get(None, {}).get("device", settings["device"])
    return train


def check_adapter_fits(model, config) -> None:
    """The targets and each targeted layer's rank bound, from shapes (`peft_core.check_fits`: r=100000
    is an error, not tens of GB), then attach `config` to `model` and take it off again: every error
    surfaces here, before anything is written, instead of in a half-made run. A method that looks at
    data first (CorDA, SPT) can only be attached after its data step, so for it the shapes decide."""
    from peft_core import attach, check_fits, get_method

    check_fits(model, config)
    if not get_method(config.method).needs_data:
        attach(model, config, name="_fits_check").remove("_fits_check")


def init_from_file(pipe, settings: dict, name: str):
    """The denoiser's handle holding adapter `name` made from --init-adapter's LoRA file, trainable; the
    run's adapter config becomes that LoRA's. A resumed run does this again and then loads its checkpoint."""
    from pipelines.families import family_of
    from pipelines.kohya import load_lora_file

    method = getattr(settings["adapter"], "method", "lora")
    if method != "lora":
        raise UserError(f"--init-adapter starts from a LoRA, so the method is lora (got --method {method})")
    path = Path(settings["init_adapter"])
    if not path.is_file() or path.suffix != ".safetensors":
        raise UserError(f"--init-adapter {path}: not a .safetensors LoRA file")
    family = family_of(pipe)
    handles = load_lora_file(pipe, path, name=name, trainable=True)
    extra = sorted(set(handles) - {family.denoiser_name})
    if extra:
        raise UserError(
            f"--init-adapter {path} also adapts {', '.join(extra)}; training continues a {family.denoiser_name} "
            "LoRA only, so pass a file without text-encoder keys"
        )
    handle = handles[family.denoiser_name]
    settings["adapter"] = handle.configs[name]
    return handle


def check_base_precision(settings: dict) -> None:
    """--base-dtype and --base-quantization against the training settings and this machine, before loading."""
    from peft_core import get_method

    train = settings["train"]
    if settings["base_dtype"] != "float32" and train.mixed_precision == "no":
        precision = "bf16" if settings["base_dtype"] == "bfloat16" else "fp16"
        raise UserError(
            f"--base-dtype {settings['base_dtype']} needs autocast for the layers that are not adapted: "
            f"add --mixed-precision {precision}"
        )
    if settings["base_quantization"] == "nf4":
        method = settings["adapter"].method
        if not get_method(method).capabilities.quantized_base:
            raise UserError(
                f"--base-quantization nf4: method {method!r} cannot train on a 4-bit base (it needs the dense "
                "weights); use lora, paca, plp or compacter, or leave the base unquantized"
            )
        try:  # bitsandbytes >= 0.45 runs its 4-bit layers on the CPU too (slowly): only the package is needed
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--base-quantization nf4 needs bitsandbytes: pip install 'peft-studio[quant]'") from None


def bucket_step(resolution: int, multiple: int) -> int:
    """Bucket sides are multiples of 64 px (kohya's usual step) from 256 px up, else of the family's own
    multiple (the embedded 64 px model: 8), so a small resolution still has buckets."""
    return 64 if resolution >= 256 and resolution % 64 == 0 else multiple


def check_regularisation(train: TrainConfig) -> None:
    """--reg-prompt goes with --reg-data (a folder of class images) or --reg-count (class images the base
    draws), and the folder's images are usable, before anything loads."""
    if train.reg_count and train.reg_data is not None:
        raise UserError(
            "--reg-count draws class images when there is no --reg-data; give the folder or the count, not both"
        )
    if train.reg_count and train.reg_prompt is None:
        raise UserError("--reg-count needs --reg-prompt: what to draw (e.g. --reg-prompt 'a photo of a dog')")
    folder_without_prompt = train.reg_data is not None and train.reg_prompt is None
    prompt_without_images = train.reg_prompt is not None and train.reg_data is None and not train.reg_count
    if folder_without_prompt or prompt_without_images:
        given, missing = ("--reg-data", "--reg-prompt") if train.reg_prompt is None else ("--reg-prompt", "--reg-data")
        raise UserError(
            f"{given} needs {missing}: the regularisation images' folder and their prompt "
            "(e.g. --reg-data class_images/ --reg-prompt 'a photo of a dog'; or --reg-count 100 to have the base "
            "model draw them)"
        )
    if train.reg_data is not None:
        from pipelines.data import validate_image_folder

        literal = train.reg_prompt.replace("{", "{{").replace("}", "}}")
        validate_image_folder(train.reg_data, template=literal)


def _processes(device: str | None):
    """accelerate's process state (on the CPU when --device cpu): which process this is, how many run."""
    import torch

    from pipelines.training import process_state

    return process_state(cpu=device == "cpu" or (device is None and not torch.cuda.is_available()))


class _Quiet:
    """What a non-main process closes instead of a progress bar."""

    def close(self) -> None:
        pass


def run(args: argparse.Namespace) -> int:
    from pipelines import load_base
    from pipelines.data import ImageCaptionDataset, validate_image_folder
    from pipelines.train import train_adapter, write_class_images
    from studio.progress import ProgressPrinter
    from studio.runs import Run, safe_run_name

    # 1. Resolve and validate everything before writing anything (a resumed run uses its own config).
    resume = getattr(args, "resume", None)
    if resume:
        run_folder = Run.open(resume)
        processes = _processes(getattr(args, "device", None))  # --device is the one start-time flag
        if processes.is_main_process:
            run_folder.acquire()  # one writer at a time: a second one is refused here, before anything loads
        settings = run_record(run_folder, f"train-{args.kind}", from_record)
        changes = apply_resume_flags(args, run_folder, settings)
        if processes.is_main_process:
            run_folder.update_config({"train": changes})
    else:
        settings = resolve(args)
        writable_folder(settings["runs_dir"], "--runs-dir")
        safe_run_name(run_name(args.kind, settings))
        processes = _processes(settings["device"])
    check_training_device(settings["train"], settings["train"].train_text_encoder)  # fp16, 8-bit, CUDA graph
    if settings["data"] == KINDS[args.kind]["data"] and not settings["data"].is_dir():
        raise UserError(
            f"the embedded demo set {settings['data']} is missing; run `studio pretrain-base` or pass a folder"
        )
    validate_image_folder(
        settings["data"], template=settings["template"], trigger=settings["trigger"]
    )  # fail before loading
    check_regularisation(settings["train"])
    check_base_precision(settings)
    pipe = load_base(
        settings["base"] or "embedded",
        device=settings["device"],
        family=family_override(settings["family"]),
        torch_dtype=torch_dtype(settings["base_dtype"]),
    )
    if settings["base_quantization"] == "nf4":
        quantize_denoiser_nf4(pipe)
    family = family_of(pipe)
    if settings["train"].train_text_encoder and not family.trains_text_encoder:
        raise UserError(
            f"--train-text-encoder is supported on Stable Diffusion 1.x/2.x only, not yet on {family.title}; "
            "train the denoiser alone"
        )
    handle = init_from_file(pipe, settings, args.kind) if settings["init_adapter"] else None
    if handle is None:
        settings["adapter"] = adapter_for_model(settings["adapter"], pipe)
        # missing targets, rank > layer: before the run folder exists
        check_adapter_fits(family.denoiser(pipe), settings["adapter"])
    resolution = settings["resolution"] or family.default_size(pipe)
    family.check_size(pipe, resolution, "--resolution")
    dataset = ImageCaptionDataset(
        settings["data"],
        resolution=resolution,
        template=settings["template"],
        trigger=settings["trigger"],
        seed=settings["train"].seed,
        random_flip=settings["train"].random_flip,
        buckets=settings["train"].buckets,
        bucket_step=bucket_step(resolution, family.size_multiple(pipe)),
        masks=settings["train"].masked_loss,
    )

    # 2. The run folder.
    config_record = {
        "data": str(settings["data"]),
        "base": settings["base"],
        "family": family.name,
        "base_dtype": settings["base_dtype"],
        "base_quantization": settings["base_quantization"],
        "resolution": resolution,
        "template": settings["template"],
        "trigger": settings["trigger"],
        "adapter": settings["adapter"].to_dict(),
        "train": dataclasses.asdict(settings["train"]),
    }
    if not resume:
        name = run_name(args.kind, settings)
        run_folder = Run.create_shared(settings["runs_dir"], name, f"train-{args.kind}", config_record, processes)
    main = processes.is_main_process
    if main:
        print(f"run folder: {run_folder.directory} ({processes.num_processes} process(es))", flush=True)

    # 3. Train (the main process logs and prints; every process trains its share of each batch).
    progress = ProgressPrinter(settings["train"].steps) if main else None
    resume_command = f"studio train-{args.kind} --resume {run_folder.directory}"
    with run_folder.lifecycle(resume_command, main_process=main) as outcome, contextlib.closing(progress or _Quiet()):
        train = settings["train"]
        if train.reg_count:  # DreamBooth's class images, drawn once by the base into the run (a resume tops up)
            folder = run_folder.directory / "class_images"
            if main:
                print(f"class images: {train.reg_count} of {train.reg_prompt!r} -> {folder}", flush=True)
                write_class_images(pipe, train, folder, resolution)
            processes.wait_for_everyone()
            train = dataclasses.replace(train, reg_data=str(folder))
        train_adapter(
            pipe,
            dataset,
            settings["adapter"],
            train,
            run_folder.directory,
            adapter_name=args.kind,
            handle=handle,
            on_event=(lambda event: (run_folder.log_event(event), progress(event))) if main else None,
        )
    if outcome.interrupted or not main:
        return outcome.exit_code
    run_folder.update(status="finished")
    print(f"adapter: {run_folder.directory / 'adapter' / args.kind}")
    if settings["train"].ema_decay > 0:
        print(f"moving average of the adapter: {run_folder.directory / 'adapter_ema' / args.kind}")
    print(f"samples: {run_folder.directory / 'samples' / 'final.png'}")
    return 0
