"""The bad-input catalogue (docs/reliability.md): each bad input gets a clear error naming what was
wrong and what to do, the CLI exits 2 with no traceback and leaves no run folder, files on disk stay
whole. A few inputs that look odd but are fine (EXIF rotation, alpha) must simply work."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from peft_core import LoraConfig, PacaConfig, attach, config_from_dict, load
from peft_core.errors import AdapterError
from peft_core.io import atomic_write_bytes, read_safetensors
from pipelines.data import ImageCaptionDataset, validate_image_folder
from pipelines.errors import UserError
from studio.cli import main

ASSETS = Path(__file__).resolve().parents[2] / "assets"
FAST = ["--steps", "1", "--batch-size", "2", "--sample-steps", "1", "--checkpoint-every", "1"]


@pytest.fixture(autouse=True)
def never_unpickle(monkeypatch):
    """Nothing in these cases may unpickle anything."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# -- helpers that make bad (and good) inputs --------------------------------------------------------
def png(path: Path, colour=(200, 30, 30), size=(32, 32), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def good_folder(root: Path, count: int = 3) -> Path:
    for i in range(count):
        png(root / f"{i}.png", colour=(40 * i, 200 - 30 * i, 90))
        (root / f"{i}.txt").write_text(f"a square number {i}")
    return root


def folder_with(tmp: Path, name: str, content: bytes | None = None, caption: bytes | None = b"a caption") -> Path:
    root = good_folder(tmp / "images")
    if content is not None:
        (root / name).write_bytes(content)
    if caption is not None:
        (root / Path(name).with_suffix(".txt")).write_bytes(caption)
    return root


def truncated_png(tmp: Path) -> bytes:
    data = png(tmp / "whole.png", size=(64, 64)).read_bytes()
    (tmp / "whole.png").unlink()
    return data[: len(data) // 2]


def tiny_unet_adapter(tmp: Path, config) -> Path:
    """An adapter saved from the micro SD's UNet: another base model than the embedded one."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    from micro_sd import micro_pipeline

    unet = micro_pipeline(tmp / "micro").unet
    return attach(unet, config, name="other").save(tmp / "other-base-adapter", name="other")


def embedded_adapter(tmp: Path, config) -> Path:
    from pipelines import load_base

    pipe = load_base("embedded", device="cpu")
    return attach(pipe.unet, config, name="mine").save(tmp / "embedded-adapter", name="mine")


class TwoLayers(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


def write_yaml(tmp: Path, text: str | bytes) -> str:
    path = tmp / "config.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


# -- CLI: exit 2, one line, no traceback, no run folder ---------------------------------------------
# (case id, argv builder(tmp) -> argv, words the message must contain, max stderr lines)
CLI_CASES = [
    ("data-folder-missing", lambda t: ["train-style", str(t / "nope")], ["does not exist", "pass the folder"], 1),
    (
        "data-folder-empty",
        lambda t: ["train-style", str((t / "e").mkdir() or t / "e")],
        ["is empty", "put the training images"],
        1,
    ),
    ("data-folder-no-images", lambda t: ["train-style", str(_only_text(t))], ["has no images", "notes.txt"], 1),
    (
        "image-zero-bytes",
        lambda t: ["train-style", str(folder_with(t, "zero.png", b""))],
        ["zero.png", "empty file (0 bytes)"],
        3,
    ),
    (
        "image-truncated",
        lambda t: ["train-style", str(folder_with(t, "cut.png", truncated_png(t)))],
        ["cut.png", "truncated"],
        3,
    ),
    (
        "image-wrong-type",
        lambda t: ["train-style", str(folder_with(t, "fake.png", b"%PDF-1.4 not an image"))],
        ["fake.png", "not an image"],
        3,
    ),
    (
        "caption-not-utf8",
        lambda t: ["train-style", str(folder_with(t, "x.png", png(t / "x.png").read_bytes(), b"caf\xe9 au lait"))],
        ["x.txt", "not UTF-8", "re-save"],
        3,
    ),
    (
        "metadata-broken-line",
        lambda t: ["train-style", str(_broken_metadata(t))],
        ["metadata.jsonl line 2", "not valid JSON"],
        3,
    ),
    (
        "image-without-caption",
        lambda t: ["train-style", str(folder_with(t, "lonely.png", png(t / "l.png").read_bytes(), None))],
        ["lonely.png", "no caption", "lonely.txt"],
        3,
    ),
    (
        "unknown-method",
        lambda t: ["train-style", "--method", "dora", *FAST],
        ["unknown method 'dora'", "available methods", "lora"],
        1,
    ),
    ("set-unknown-key", lambda t: ["train-style", "--set", "rnak=4", *FAST], ["unknown key 'rnak'", "valid keys"], 1),
    ("set-without-value", lambda t: ["train-style", "--set", "dropout", *FAST], ["--set expects KEY=VALUE"], 1),
    ("steps-zero", lambda t: ["train-style", "--steps", "0"], ["steps must be >= 1"], 1),
    (
        "lr-schedule-unknown",
        lambda t: ["train-style", "--lr-schedule", "exp", *FAST],
        ["lr_schedule='exp'", "constant, cosine, linear"],
        1,
    ),
    (
        "yaml-unknown-key",
        lambda t: ["train-style", "--config", write_yaml(t, "train:\n  stepz: 3\n"), *FAST],
        ["unknown option 'stepz'", "valid options"],
        1,
    ),
    (
        "yaml-unknown-top-key",
        lambda t: ["train-style", "--config", write_yaml(t, "colour: red\n"), *FAST],
        ["unknown option(s)", "colour"],
        1,
    ),
    (
        "yaml-wrong-type",
        lambda t: ["train-style", "--config", write_yaml(t, "train:\n  batch_size: two\n")],
        ["'batch_size'", "expects int", "'two'"],
        1,
    ),
    (
        "yaml-adapter-wrong-type",
        lambda t: ["train-style", "--config", write_yaml(t, "adapter:\n  r: [4]\n"), *FAST],
        ["'r'", "expects int"],
        1,
    ),
    (
        "yaml-not-a-mapping",
        lambda t: ["train-style", "--config", write_yaml(t, "- steps\n- 3\n")],
        ["must hold a mapping", "not a list"],
        1,
    ),
    (
        "yaml-invalid",
        lambda t: ["train-style", "--config", write_yaml(t, "train: {steps: 3\n")],
        ["is not valid YAML"],
        1,
    ),
    (
        "yaml-not-utf8",
        lambda t: ["train-style", "--config", write_yaml(t, b"name: caf\xe9\n")],
        ["is not valid YAML"],
        1,
    ),
    ("yaml-missing", lambda t: ["train-style", "--config", str(t / "none.yaml")], ["config file", "does not exist"], 1),
    (
        "base-missing-path",
        lambda t: ["train-style", "--base", str(t / "no-such-model"), *FAST],
        ["not found", "'embedded'"],
        1,
    ),
    (
        "base-folder-not-diffusers",
        lambda t: ["train-style", "--base", str((t / "m").mkdir() or t / "m"), *FAST],
        ["no model_index.json", "diffusers folder"],
        1,
    ),
    (
        "base-interrupted-download",
        lambda t: ["train-style", "--base", str(_half_downloaded_base(t)), *FAST],
        ["could not load the diffusers folder", "interrupted download"],
        1,
    ),
    (
        "base-pickle-checkpoint",
        lambda t: ["train-style", "--base", str(_pickle_file(t / "model.ckpt")), *FAST],
        ["pickle checkpoint", "convert it to .safetensors"],
        1,
    ),
    (
        "base-wrong-file-type",
        lambda t: ["train-style", "--base", str(_text_file(t / "model.txt")), *FAST],
        ["not a checkpoint file"],
        1,
    ),
    (
        "targets-missing",
        lambda t: ["train-style", "--targets", "to_qq", *FAST],
        ["no module matches targets=['to_qq']", "adaptable modules"],
        1,
    ),
    (
        "paca-rank-larger-than-layer",
        lambda t: ["train-style", "--method", "paca", "--rank", "4096", *FAST],
        ["r=4096 is larger than", "use r <="],
        1,
    ),
    ("resume-not-a-run", lambda t: ["train-style", "--resume", str(t)], ["is not a run folder", "studio train-"], 1),
    (
        "generate-adapter-missing",
        lambda t: ["generate", "--prompt", "a star", "--adapter", str(t / "gone")],
        ["does not exist"],
        1,
    ),
    (
        "generate-adapter-other-base",
        lambda t: [
            "generate",
            "--prompt",
            "a star",
            "--adapter",
            str(tiny_unet_adapter(t, LoraConfig(targets=["to_q"], r=2))),
        ],
        ["does not match", "to_q"],
        1,
    ),
    (
        "generate-adapter-pickle",
        lambda t: ["generate", "--prompt", "a star", "--adapter", str(_pickle_adapter(t))],
        ["adapter_model.bin", "pickle", "never read", "convert it to safetensors"],
        1,
    ),
    (
        "generate-adapter-truncated",
        lambda t: ["generate", "--prompt", "a star", "--adapter", str(_truncated_adapter(t))],
        ["not a readable safetensors file", "truncated"],
        1,
    ),
    (
        "generate-adapter-config-damaged",
        lambda t: ["generate", "--prompt", "a star", "--adapter", str(_damaged_config(t))],
        ["not valid JSON", "re-save"],
        1,
    ),
]


def _only_text(tmp: Path) -> Path:
    (tmp / "t").mkdir()
    (tmp / "t" / "notes.txt").write_text("no pictures here")
    return tmp / "t"


def _broken_metadata(tmp: Path) -> Path:
    root = good_folder(tmp / "images")
    for i in range(3):
        (root / f"{i}.txt").unlink()
    (root / "metadata.jsonl").write_text(
        '{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png", "text": \n{"file_name": "2.png", "text": "c"}\n'
    )
    return root


def _half_downloaded_base(tmp: Path) -> Path:
    target = tmp / "half-sd"
    shutil.copytree(ASSETS / "tiny-sd", target)
    for weights in target.glob("unet/*.safetensors"):
        weights.unlink()  # the download stopped before the UNet's weights arrived
    return target


def _pickle_file(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": {}}))
    return path


def _text_file(path: Path) -> Path:
    path.write_text("hello")
    return path


def _pickle_adapter(tmp: Path) -> Path:
    folder = embedded_adapter(tmp, LoraConfig(targets=["to_q"], r=2))
    (folder / "adapter_model.safetensors").unlink()
    _pickle_file(folder / "adapter_model.bin")
    return folder


def _truncated_adapter(tmp: Path) -> Path:
    folder = embedded_adapter(tmp, LoraConfig(targets=["to_q"], r=2))
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


def _damaged_config(tmp: Path) -> Path:
    folder = embedded_adapter(tmp, LoraConfig(targets=["to_q"], r=2))
    (folder / "adapter_config.json").write_text('{"format_version": 1, "config": {"method": "lo')
    return folder


# -- every command: options, devices, folders, files, run records (issue 26) ---------------------------
# Each case fails before any run folder or output exists; most before any model loads.
NO_CUDA = not torch.cuda.is_available()
CPU_ONLY = set()  # cases that are bad input only on a machine without CUDA (skipped where it has one)


def cpu_only(case: tuple) -> tuple:
    CPU_ONLY.add(case[0])
    return case


def _read_only(tmp: Path) -> Path:
    """A folder this process cannot write in. Root writes through permission bits, so as root: /sys,
    where no one can create files."""
    if os.geteuid() == 0:
        return Path("/sys/peft-studio-test")
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _file(tmp: Path, name: str = "a-file", content: bytes = b"x") -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


def _fake_run(tmp: Path, kind: str, config: str) -> Path:
    """A run folder of `kind` whose config.yaml holds `config` (text, possibly damaged)."""
    folder = tmp / f"run-{kind}"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"kind": kind, "status": "interrupted", "step": 1}))
    (folder / "config.yaml").write_text(config)
    return folder


def _jsonl(tmp: Path, text: str | bytes, name: str = "data.jsonl") -> str:
    return str(_file(tmp, name, text.encode() if isinstance(text, str) else text))


GOOD_ROWS = '{"instruction": "say hi", "response": "hi"}\n{"instruction": "say yo", "response": "yo"}\n'


def _pickle_lm(tmp: Path) -> Path:
    """A transformers folder whose only weights are a pickle pytorch_model.bin."""
    folder = tmp / "lm"
    folder.mkdir()
    shutil.copy(ASSETS / "tiny-lm" / "config.json", folder / "config.json")
    _pickle_file(folder / "pytorch_model.bin")
    return folder


def _pickle_sd(tmp: Path) -> Path:
    """A diffusers folder whose UNet weights are a pickle diffusion_pytorch_model.bin."""
    folder = tmp / "sd"
    (folder / "unet").mkdir(parents=True)
    shutil.copy(ASSETS / "tiny-sd" / "model_index.json", folder / "model_index.json")
    _pickle_file(folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


def _safetensors_without_sd(tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"classifier.weight": torch.zeros(2, 2)}, str(tmp / "classifier.safetensors"))
    return tmp / "classifier.safetensors"


def _images_with(tmp: Path, name: str, make) -> Path:
    root = good_folder(tmp / "images")
    make(root, name)
    return root


def _dark_16_bit(root: Path, name: str) -> None:
    values = (np.arange(32 * 32).reshape(32, 32) * 2).astype(np.uint16)  # 12-bit data: at most 2046
    Image.fromarray(values).save(root / name)
    (root / Path(name).with_suffix(".txt")).write_text("a dark scan")


def _dangling(root: Path, name: str) -> None:
    os.symlink(root / "moved-away.png", root / name)


def _loop(root: Path, name: str) -> None:
    os.symlink(root / name, root / name)


def _blank_caption(root: Path, name: str) -> None:
    png(root / name, colour=(1, 2, 250))
    (root / Path(name).with_suffix(".txt")).write_text("   \n\t\n")


def _huge_caption(root: Path, name: str) -> None:
    png(root / name, colour=(1, 250, 2))
    (root / Path(name).with_suffix(".txt")).write_bytes(b"word " * 2_000_000)  # 10 MB


def _tiny_image(root: Path, name: str) -> None:
    png(root / name, size=(8, 8), colour=(9, 99, 199))
    (root / Path(name).with_suffix(".txt")).write_text("tiny")


def _all_identical(tmp: Path) -> Path:
    for i in range(3):
        png(tmp / "same" / f"{i}.png")
        (tmp / "same" / f"{i}.txt").write_text("same")
    return tmp / "same"


def yaml_case(command: str, text: str, words: list[str], *extra: str) -> tuple:
    return (
        f"{command}-yaml-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40],
        lambda t: [command, "--config", write_yaml(t, text), *extra],
        words,
        1,
    )


TRAIN = [
    cpu_only(
        (
            "device-cuda-without-gpu",
            lambda t: ["train-style", "--device", "cuda", *FAST],
            ["device 'cuda'", "no CUDA GPU"],
            1,
        )
    ),
    (
        "device-not-a-device",
        lambda t: ["train-style", "--device", "gpu", *FAST],
        ["device 'gpu'", "cpu, cuda or cuda:N"],
        1,
    ),
    cpu_only(
        (
            "fp16-without-gpu",
            lambda t: ["train-content", "--mixed-precision", "fp16", *FAST],
            ["fp16", "needs a CUDA GPU", "bf16"],
            1,
        )
    ),
    cpu_only(
        (
            "cuda-graph-on-without-gpu",
            lambda t: ["train-style", "--cuda-graph", "on", *FAST],
            ["cuda_graph 'on' is not possible", "CUDA GPU"],
            1,
        )
    ),
    cpu_only(
        (
            "adamw8bit-without-gpu",
            lambda t: ["train-style", "--optimizer", "adamw8bit", *FAST],
            ["adamw8bit", "CUDA GPU"],
            1,
        )
    ),
    ("seed-huge", lambda t: ["train-style", "--seed", str(2**70)], ["seed must be <= 4294967295"], 1),
    ("resolution-huge", lambda t: ["train-style", "--resolution", "100000"], ["resolution must be <= 4096"], 1),
    ("resolution-not-multiple-of-8", lambda t: ["train-content", "--resolution", "100"], ["multiple of 8", "100"], 1),
    ("resolution-zero", lambda t: ["train-style", "--resolution", "0"], ["resolution must be >= 8"], 1),
    (
        "runs-dir-is-a-file",
        lambda t: ["train-style", "--runs-dir", str(_file(t)), *FAST],
        ["is a file, not a folder"],
        1,
    ),
    ("runs-dir-read-only", lambda t: ["train-style", "--runs-dir", str(_read_only(t)), *FAST], ["cannot write in"], 1),
    (
        "runs-dir-under-a-file",
        lambda t: ["train-content", "--runs-dir", str(_file(t) / "runs"), *FAST],
        ["is a file, so no folder can be made there"],
        1,
    ),
    ("name-unusable", lambda t: ["train-style", "--name", "///", *FAST], ["no usable characters"], 1),
    (
        "lora-rank-huge",
        lambda t: ["train-style", "--rank", "100000", *FAST],
        ["r=100000 is larger than", "rank bound"],
        1,
    ),
    (
        "lora-rank-larger-than-layer",
        lambda t: ["train-content", "--rank", "200", "--targets", "to_q", *FAST],
        ["r=200", "use r <= 64"],
        1,
    ),
    ("plp-rank-huge", lambda t: ["train-style", "--method", "plp", "--rank", "100000", *FAST], ["plp: r=100000"], 1),
    (
        "corda-rank-huge",
        lambda t: ["train-style", "--method", "corda", "--rank", "100000", *FAST],
        ["corda: r=100000"],
        1,
    ),
    ("compacter-rank", lambda t: ["train-style", "--method", "compacter", "--rank", "4", *FAST], ["has no rank r"], 1),
    ("sample-steps-zero", lambda t: ["train-style", "--sample-steps", "0"], ["sample_steps must be >= 1"], 1),
    ("sample-steps-huge", lambda t: ["train-style", "--sample-steps", "5000"], ["sample_steps must be <= 1000"], 1),
    ("sample-guidance-nan", lambda t: ["train-style", "--sample-guidance", "nan"], ["finite number", "nan"], 1),
    ("learning-rate-zero", lambda t: ["train-style", "--learning-rate", "0"], ["learning_rate must be > 0"], 1),
    ("learning-rate-inf", lambda t: ["train-content", "--learning-rate", "inf"], ["finite number"], 1),
    (
        "set-dropout-out-of-range",
        lambda t: ["train-style", "--set", "dropout=2", *FAST],
        ["dropout must be in [0, 1)"],
        1,
    ),
    (
        "set-bool-not-a-bool",
        lambda t: ["train-style", "--set", "use_rslora=maybe", *FAST],
        ["expects bool", "'maybe'"],
        1,
    ),
    (
        "template-without-trigger",
        lambda t: ["train-content", "--template", "a {trigger}", *FAST],
        ["pass a trigger exactly when"],
        1,
    ),
    ("trigger-without-template", lambda t: ["train-content", "--trigger", "sks", *FAST], ["needs a template"], 1),
    (
        "template-unknown-field",
        lambda t: ["train-style", "--template", "a {colour} cat", *FAST],
        ["only {trigger} and {caption}"],
        1,
    ),
    yaml_case(
        "train-style", "train:\n  learning_rate: 1e-3\n", ["'learning_rate'", "YAML reads 1e-3 as text", "1.0e-3"]
    ),
    yaml_case(
        "train-style", "adapter:\n  dropout: 1e-1\n", ["'dropout'", "YAML reads 1e-1 as text", "write 0.1"], *FAST
    ),
    yaml_case("train-style", "train:\n  sample_prompts: [1, 2]\n", ["'sample_prompts'", "expects str, got 1"]),
    yaml_case("train-style", "train: [1]\n", ["'train'", "must be a mapping"]),
    yaml_case("train-content", 'train: ""\n', ["'train'", "must be a mapping"]),
    yaml_case("train-style", "adapter:\n  hyperparameters: 5\n", ["'hyperparameters'", "expects a mapping"]),
    yaml_case("train-style", "train:\n  steps: 3.5\n", ["'steps'", "expects int", "3.5"]),
    yaml_case("train-style", "adapter:\n  targets: 5\n", ["'targets'", "expects a list"]),
    yaml_case("train-style", "resolution: 12\n", ["multiple of 8"]),
    (
        "resume-an-llm-run",
        lambda t: ["train-style", "--resume", str(_fake_run(t, "train-llm", "kind: train-llm\n"))],
        ["is a train-llm run", "not a `studio train-style` run"],
        1,
    ),
    (
        "resume-a-style-run-as-content",
        lambda t: ["train-content", "--resume", str(_fake_run(t, "train-style", "kind: train-style\n"))],
        ["is a train-style run", "not a `studio train-content` run"],
        1,
    ),
    (
        "resume-config-damaged",
        lambda t: ["train-style", "--resume", str(_fake_run(t, "train-style", "kind: [train-style\n"))],
        ["config.yaml is damaged", "start a new run"],
        1,
    ),
    (
        "resume-config-incomplete",
        lambda t: ["train-style", "--resume", str(_fake_run(t, "train-style", "kind: train-style\ndata: x\n"))],
        ["config.yaml lacks 'train'"],
        1,
    ),
    (
        "resume-config-not-a-mapping",
        lambda t: ["train-style", "--resume", str(_fake_run(t, "train-style", "- 1\n"))],
        ["not a mapping"],
        1,
    ),
    (
        "base-safetensors-not-sd",
        lambda t: ["train-style", "--base", str(_safetensors_without_sd(t)), *FAST],
        ["holds no Stable Diffusion weights", "classifier.weight"],
        1,
    ),
    (
        "base-safetensors-garbage",
        lambda t: ["train-style", "--base", str(_file(t, "m.safetensors", b"hello")), *FAST],
        ["not a readable safetensors file"],
        1,
    ),
    (
        "base-diffusers-folder-pickle-weights",
        lambda t: ["train-style", "--base", str(_pickle_sd(t)), *FAST],
        ["diffusion_pytorch_model.bin is a pickle file", "never read"],
        1,
    ),
    (
        "image-16-bit-dark",
        lambda t: ["train-style", str(_images_with(t, "scan.png", _dark_16_bit)), *FAST],
        ["scan.png", "16-bit image", "black"],
        3,
    ),
    (
        "image-dangling-link",
        lambda t: ["train-style", str(_images_with(t, "gone.png", _dangling)), *FAST],
        ["gone.png", "a broken link"],
        3,
    ),
    (
        "image-link-loop",
        lambda t: ["train-style", str(_images_with(t, "loop.png", _loop)), *FAST],
        ["loop.png", "loops back on itself"],
        3,
    ),
    (
        "caption-whitespace-only",
        lambda t: ["train-style", str(_images_with(t, "blank.png", _blank_caption)), *FAST],
        ["blank.png", "empty caption"],
        3,
    ),
    (
        "caption-10-mb",
        lambda t: ["train-style", str(_images_with(t, "long.png", _huge_caption)), *FAST],
        ["long.txt", "over the limit of 10,000 characters"],
        3,
    ),
    (
        "image-too-small",
        lambda t: ["train-content", str(_images_with(t, "tiny.png", _tiny_image)), *FAST],
        ["tiny.png", "too small", "use a larger picture"],
        3,
    ),
    (
        "images-all-identical",
        lambda t: ["train-style", str(_all_identical(t)), *FAST],
        ["identical pixels", "keep one copy"],
        3,
    ),
]

LLM = [
    (
        "llm-data-missing",
        lambda t: ["train-llm", str(t / "nope.jsonl"), "--steps", "1"],
        ["data file", "does not exist"],
        1,
    ),
    (
        "llm-data-latin-1",
        lambda t: ["train-llm", _jsonl(t, b'{"text": "caf\xe9"}\n'), "--steps", "1"],
        ["line 1: not UTF-8", "0xe9", "re-save"],
        1,
    ),
    (
        "llm-data-bad-json",
        lambda t: ["train-llm", _jsonl(t, "{oops\n"), "--steps", "1"],
        ["line 1: invalid JSON", "--skip-bad-lines"],
        1,
    ),
    ("llm-data-empty", lambda t: ["train-llm", _jsonl(t, ""), "--steps", "1"], ["has no usable rows"], 1),
    (
        "llm-data-unknown-fields",
        lambda t: ["train-llm", _jsonl(t, '{"question": "x"}\n'), "--steps", "1"],
        ["no known fields", "question"],
        1,
    ),
    (
        "llm-eval-missing",
        lambda t: ["train-llm", _jsonl(t, GOOD_ROWS), "--eval", str(t / "nope.jsonl")],
        ["nope.jsonl", "does not exist"],
        1,
    ),
    (
        "llm-calibration-missing",
        lambda t: ["train-llm", _jsonl(t, GOOD_ROWS), "--method", "corda", "--calibration-data", str(t / "c.jsonl")],
        ["c.jsonl", "does not exist"],
        1,
    ),
    (
        "llm-max-length-1",
        lambda t: ["train-llm", _jsonl(t, GOOD_ROWS), "--max-length", "1"],
        ["no training sequence has a response token"],
        1,
    ),
    (
        "llm-rank-larger-than-layer",
        lambda t: ["train-llm", "--rank", "100"],
        ["r=100 is larger than", "rank bound 64"],
        1,
    ),
    ("llm-targets-missing", lambda t: ["train-llm", "--targets", "nope_proj"], ["no module matches", "nope_proj"], 1),
    ("llm-base-missing", lambda t: ["train-llm", "--base", str(t / "nope")], ["not found"], 1),
    (
        "llm-base-pickle-weights",
        lambda t: ["train-llm", "--base", str(_pickle_lm(t))],
        ["pytorch_model.bin is a pickle file", "never read"],
        1,
    ),
    (
        "llm-base-folder-without-config",
        lambda t: ["train-llm", "--base", str(t)],
        ["could not read the model config"],
        1,
    ),
    cpu_only(
        ("llm-adamw8bit-without-gpu", lambda t: ["train-llm", "--optimizer", "adamw8bit"], ["adamw8bit", "CUDA GPU"], 1)
    ),
    cpu_only(("llm-4bit-without-gpu", lambda t: ["train-llm", "--load-in-4bit"], ["--load-in-4bit", "CUDA GPU"], 1)),
    ("llm-loram-ratio-1", lambda t: ["train-llm", "--loram-ratio", "1"], ["loram_ratio must be in [0, 1)"], 1),
    (
        "llm-loram-with-compacter",
        lambda t: ["train-llm", "--method", "compacter", "--loram-ratio", "0.5"],
        ["LoRAM recovers"],
        1,
    ),
    (
        "llm-save-merged-compacter",
        lambda t: ["train-llm", "--method", "compacter", "--save-merged"],
        ["cannot be merged"],
        1,
    ),
    ("llm-runs-dir-is-a-file", lambda t: ["train-llm", "--runs-dir", str(_file(t))], ["is a file, not a folder"], 1),
    (
        "llm-resume-a-style-run",
        lambda t: ["train-llm", "--resume", str(_fake_run(t, "train-style", "kind: train-style\n"))],
        ["is a train-style run", "not a `studio train-llm` run"],
        1,
    ),
    (
        "llm-resume-config-incomplete",
        lambda t: ["train-llm", "--resume", str(_fake_run(t, "train-llm", "kind: train-llm\n"))],
        ["config.yaml lacks 'adapter'"],
        1,
    ),
    yaml_case("train-llm", "train:\n  learning_rate: 1e-3\n", ["YAML reads 1e-3 as text"]),
    yaml_case("train-llm", "eval: data.jsonl\n", ["'eval'", "expects a list"]),
]

B4M = [
    ("b4m-device-not-a-device", lambda t: ["break-for-make", "--device", "tpu"], ["device 'tpu'"], 1),
    ("b4m-content-missing", lambda t: ["break-for-make", "--content", str(t / "nope")], ["does not exist"], 1),
    (
        "b4m-runs-dir-is-a-file",
        lambda t: ["break-for-make", "--runs-dir", str(_file(t))],
        ["is a file, not a folder"],
        1,
    ),
    yaml_case("break-for-make", "b4m:\n  rank: 100000\n", ["plp: r=100000", "rank bound"]),
    yaml_case("break-for-make", "b4m:\n  break_steps: many\n", ["'break_steps'", "expects int"]),
    yaml_case("break-for-make", "b4m:\n  targets: []\n", ["`targets` is empty"]),
    (
        "b4m-resume-a-style-run",
        lambda t: ["break-for-make", "--resume", str(_fake_run(t, "train-style", "kind: train-style\n"))],
        ["is a train-style run"],
        1,
    ),
    (
        "b4m-resume-config-incomplete",
        lambda t: ["break-for-make", "--resume", str(_fake_run(t, "break-for-make", "kind: break-for-make\n"))],
        ["config.yaml lacks 'b4m'"],
        1,
    ),
]

GENERATE = [
    ("generate-size-7", lambda t: ["generate", "--prompt", "a", "--size", "7"], ["size must be >= 8"], 1),
    (
        "generate-size-not-multiple-of-8",
        lambda t: ["generate", "--prompt", "a", "--size", "100"],
        ["size must be a multiple of 8"],
        1,
    ),
    ("generate-size-huge", lambda t: ["generate", "--prompt", "a", "--size", "100000"], ["size must be <= 4096"], 1),
    ("generate-steps-huge", lambda t: ["generate", "--prompt", "a", "--steps", "100000"], ["steps must be <= 1000"], 1),
    (
        "generate-guidance-nan",
        lambda t: ["generate", "--prompt", "a", "--guidance", "nan"],
        ["guidance must be a finite number"],
        1,
    ),
    ("generate-no-prompt", lambda t: ["generate"], ["give at least one --prompt"], 1),
    (
        "generate-out-is-a-folder",
        lambda t: ["generate", "--prompt", "a", "--out", str(t)],
        ["is a folder", "name the file"],
        1,
    ),
    (
        "generate-out-read-only",
        lambda t: ["generate", "--prompt", "a", "--out", str(_read_only(t) / "x.png")],
        ["cannot write in"],
        1,
    ),
    (
        "generate-out-under-a-file",
        lambda t: ["generate", "--prompt", "a", "--out", str(_file(t) / "x.png")],
        ["is a file, so no folder can be made there"],
        1,
    ),
    (
        "generate-out-not-png",
        lambda t: ["generate", "--prompt", "a", "--out", str(t / "x.jpg")],
        ["must end in .png"],
        1,
    ),
    (
        "generate-adapter-weight-not-a-number",
        lambda t: ["generate", "--prompt", "a", "--adapter", f"{t}:abc"],
        ["weight after ':' must be a number", "'abc'"],
        1,
    ),
    (
        "generate-adapter-weight-nan",
        lambda t: ["generate", "--prompt", "a", "--adapter", f"{t}:nan"],
        ["finite number"],
        1,
    ),
    cpu_only(
        (
            "generate-device-cuda-without-gpu",
            lambda t: ["generate", "--prompt", "a", "--device", "cuda"],
            ["no CUDA GPU"],
            1,
        )
    ),
    (
        "generate-device-index-out-of-range",
        lambda t: ["generate", "--prompt", "a", "--device", "cuda:99"],
        ["device 'cuda:99'"],
        1,
    ),
    (
        "generate-base-safetensors-not-sd",
        lambda t: ["generate", "--prompt", "a", "--base", str(_safetensors_without_sd(t))],
        ["holds no Stable Diffusion weights"],
        1,
    ),
    ("compose-nothing", lambda t: ["compose", "--prompt", "a"], ["compose needs"], 1),
    ("data-check-missing", lambda t: ["data", "check", str(t / "nope.jsonl")], ["data file", "does not exist"], 1),
    ("data-check-no-file", lambda t: ["data", "check"], ["give the data to check"], 1),
    (
        "compose-b4m-and-content",
        lambda t: ["compose", "--prompt", "a", "--b4m", str(t), "--content", str(t)],
        ["not both"],
        1,
    ),
    (
        "compose-b4m-not-b4m",
        lambda t: ["compose", "--prompt", "a", "--b4m", str(t)],
        ["not a Break-for-Make folder"],
        1,
    ),
    (
        "compose-style-missing",
        lambda t: ["compose", "--prompt", "a", "--style", str(t / "gone")],
        ["does not exist"],
        1,
    ),
]

OTHERS = [
    ("export-no-out", lambda t: ["export", str(t)], ["name the adapter", "--out"], 1),
    (
        "export-component-unknown",
        lambda t: ["export", str(t), "--out", "o", "--component", "nonsense"],
        ["component='nonsense' is not one of"],
        1,
    ),
    (
        "export-format-unknown",
        lambda t: ["export", str(t), "--out", "o", "--format", "onnx"],
        ["format='onnx' is not one of"],
        1,
    ),
    ("export-adapter-missing", lambda t: ["export", str(t / "gone"), "--out", "o"], ["does not exist"], 1),
    (
        "export-out-is-a-file",
        lambda t: ["export", str(embedded_adapter(t, LoraConfig(targets=["to_q"], r=2))), "--out", str(_file(t))],
        ["is a file, not a folder"],
        1,
    ),
    (
        "export-adapter-of-another-component",
        lambda t: [
            "export",
            str(embedded_adapter(t, LoraConfig(targets=["to_q"], r=2))),
            "--out",
            "o",
            "--component",
            "text_encoder",
        ],
        ["no module matches targets=['to_q']"],
        1,
    ),
    ("analyze-device-not-a-device", lambda t: ["analyze", "--device", "gpu"], ["device 'gpu'"], 1),
    ("analyze-model-missing", lambda t: ["analyze", "--model", str(t / "nope")], ["cannot tell whether"], 1),
    ("analyze-data-bad-json", lambda t: ["analyze", "--data", _jsonl(t, "{oops\n")], ["line 1: not valid JSON"], 1),
    (
        "analyze-data-latin-1",
        lambda t: ["analyze", "--data", _jsonl(t, b"caf\xe9\n", "text.txt")],
        ["not UTF-8", "re-save"],
        1,
    ),
    ("analyze-out-is-a-file", lambda t: ["analyze", "--out", str(_file(t))], ["is a file, not a folder"], 1),
    (
        "analyze-kind-contradicts-model",
        lambda t: ["analyze", "--model", "embedded-lm", "--kind", "sd"],
        ["but --kind says sd"],
        1,
    ),
    (
        "analyze-data-for-sd",
        lambda t: ["analyze", "--model", "embedded-sd", "--data", _jsonl(t, GOOD_ROWS)],
        ["--data is text for a language model"],
        1,
    ),
    ("analyze-steps-huge", lambda t: ["analyze", "--steps", "5000"], ["steps must be <= 1000"], 1),
    ("analyze-seq-len-1", lambda t: ["analyze", "--seq-len", "1"], ["seq_len must be >= 2"], 1),
    ("analyze-adapter-missing", lambda t: ["analyze", "--adapter", str(t / "gone")], ["does not exist"], 1),
    ("chat-no-prompt", lambda t: ["chat"], ["give at least one --prompt"], 1),
    ("chat-empty-prompt", lambda t: ["chat", "--prompt", "  "], ["is empty"], 1),
    ("chat-out-is-a-folder", lambda t: ["chat", "--prompt", "hi", "--out", str(t)], ["is a folder"], 1),
    (
        "chat-out-not-json",
        lambda t: ["chat", "--prompt", "hi", "--out", str(t / "replies.txt")],
        ["must end in .json"],
        1,
    ),
    ("chat-not-a-run", lambda t: ["chat", str(t), "--prompt", "hi"], ["is not a run folder"], 1),
    (
        "chat-a-style-run",
        lambda t: ["chat", str(_fake_run(t, "train-style", "kind: train-style\n")), "--prompt", "hi"],
        ["is a train-style run", "not a `studio train-llm` run"],
        1,
    ),
    (
        "chat-config-damaged",
        lambda t: ["chat", str(_fake_run(t, "train-llm", "{oops\n")), "--prompt", "hi"],
        ["config.yaml is damaged"],
        1,
    ),
    ("chat-top-p-zero", lambda t: ["chat", "--prompt", "hi", "--top-p", "0"], ["top_p must be > 0"], 1),
    ("chat-temperature-nan", lambda t: ["chat", "--prompt", "hi", "--temperature", "nan"], ["finite number"], 1),
    (
        "chat-base-pickle-weights",
        lambda t: ["chat", "--prompt", "hi", "--base", str(_pickle_lm(t))],
        ["is a pickle file", "never read"],
        1,
    ),
    cpu_only(("pretrain-device-cuda-without-gpu", lambda t: ["pretrain-base", "--device", "cuda"], ["no CUDA GPU"], 1)),
    ("pretrain-device-not-a-device", lambda t: ["pretrain-base", "--device", "tpu"], ["device 'tpu'"], 1),
    ("pretrain-stages-unknown", lambda t: ["pretrain-base", "--stages", "sets,bogus"], ["unknown stage(s) bogus"], 1),
    ("pretrain-stages-empty", lambda t: ["pretrain-base", "--stages", ","], ["no stage"], 1),
    ("pretrain-scale-unknown", lambda t: ["pretrain-base", "--scale", "huge"], ["scale='huge' is not one of"], 1),
    ("pretrain-set-unknown-key", lambda t: ["pretrain-base", "--set", "nope=1"], ["expected KEY=VALUE"], 1),
    ("pretrain-set-negative", lambda t: ["pretrain-base", "--set", "sd_steps=-5"], ["must be a finite number >= 0"], 1),
    ("pretrain-out-is-a-file", lambda t: ["pretrain-base", "--out", str(_file(t))], ["is a file, not a folder"], 1),
    ("demo-steps-zero", lambda t: ["demo", "--steps", "0"], ["steps must be >= 1"], 1),
    ("demo-seed-negative", lambda t: ["demo", "--seed", "-1"], ["seed must be >= 0"], 1),
    yaml_case("demo", "stepz: 3\n", ["unknown option(s)", "stepz"]),
    ("ui-port-zero", lambda t: ["ui", "--port", "0"], ["port must be >= 1"], 1),
    ("ui-port-too-large", lambda t: ["ui", "--port", "70000"], ["port must be <= 65535"], 1),
    ("ui-auth-without-colon", lambda t: ["ui", "--auth", "admin"], ["expected USER:PASS"], 1),
    ("ui-auth-file-missing", lambda t: ["ui", "--auth-file", str(t / "users.txt")], ["auth file", "does not exist"], 1),
    (
        "ui-auth-file-only-comments",
        lambda t: ["ui", "--auth-file", str(_file(t, "users.txt", b"# nobody\n"))],
        ["holds no USER:PASS line"],
        1,
    ),
    ("ui-max-upload-zero", lambda t: ["ui", "--max-upload-mb", "0"], ["max_upload_mb must be > 0"], 1),
    ("ui-workspace-is-a-file", lambda t: ["ui", "--workspace", str(_file(t))], ["is a file, not a folder"], 1),
]

CLI_CASES += TRAIN + LLM + B4M + GENERATE + OTHERS
# Options the CLI does not have: no message may advise them.
API_ONLY_WORDS = ("min_side", "max_pixels", "repeats=")


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c[0], marks=pytest.mark.skipif(c[0] in CPU_ONLY and not NO_CUDA, reason="CUDA is here"))
        for c in CLI_CASES
    ],
)
def test_cli_bad_input(case, tmp_path, capsys, monkeypatch):
    _, make_argv, words, max_lines = case
    monkeypatch.chdir(tmp_path)  # generate's default --out, any stray relative path
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    runs = tmp_path / "runs"
    argv = make_argv(inputs)
    if argv[0].startswith("train-") or argv[0] == "break-for-make":
        argv += [] if "--runs-dir" in argv or "--resume" in argv else ["--runs-dir", str(runs)]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    message = "\n".join(line for line in err.splitlines() if line.startswith(("error:", "  - ")))
    assert code == 2, err  # main returns only for a caught UserError/AdapterError; anything else raises
    assert "Traceback" not in err, err
    assert message.startswith("error: ") and err.count("error:") == 1, err
    assert len(message.splitlines()) <= max_lines, message
    for word in words:
        assert word in message, (word, message)
    assert not any(word in message for word in API_ONLY_WORDS), message
    assert not runs.exists() or not any(runs.iterdir()), f"left a run folder: {list(runs.iterdir())}"
    # Nothing written anywhere under the test's folder (generate.png, analysis/, a run, a lock, a probe file).
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# -- Python API -------------------------------------------------------------------------------------
def _attach_missing_targets(tmp):
    attach(TwoLayers(), LoraConfig(targets=["k_proj"]))


def _paca_rank_too_large(tmp):
    attach(TwoLayers(width=8), PacaConfig(targets=["q_proj"], r=9))


def _load_other_shape(tmp):
    attach(TwoLayers(width=8), LoraConfig(targets=["q_proj"], r=2)).save(tmp / "a")
    model = TwoLayers(width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load(model, tmp / "a")
    finally:  # all-or-nothing: the model is untouched
        assert type(model.q_proj) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _load_other_method_state(tmp):
    lora = attach(TwoLayers(), LoraConfig(targets=["q_proj"], r=2))
    paca = attach(TwoLayers(), PacaConfig(targets=["q_proj"], r=2))
    paca.load_state_dict(lora.state_dict())


def _load_pickle_weights(tmp):
    folder = attach(TwoLayers(), LoraConfig(targets=["q_proj"], r=2)).save(tmp / "a")
    (folder / "adapter_model.safetensors").unlink()
    _pickle_file(folder / "adapter_model.pt")
    load(TwoLayers(), folder)


def _read_pickle_as_safetensors(tmp):
    read_safetensors(_pickle_file(tmp / "weights.safetensors"))


def _load_peft_format_folder(tmp):
    (tmp / "peft").mkdir()
    (tmp / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    load(TwoLayers(), tmp / "peft")


def _bomb(tmp):
    folder = good_folder(tmp / "images")
    png(folder / "huge.png", size=(300, 300))
    (folder / "huge.txt").write_text("big")
    validate_image_folder(folder, max_pixels=50_000)


API_CASES = [
    (
        "config-unknown-method",
        lambda t: config_from_dict({"method": "nope", "targets": ["q"]}),
        AdapterError,
        "unknown method 'nope'; available methods",
    ),
    (
        "config-unknown-key",
        lambda t: config_from_dict({"method": "lora", "targets": ["q"], "rank": 4}),
        AdapterError,
        "unknown key 'rank' in a 'lora' config; valid keys",
    ),
    (
        "config-wrong-type",
        lambda t: config_from_dict({"method": "lora", "targets": ["q"], "r": "8"}),
        AdapterError,
        "'lora' config key 'r' expects int, got '8'",
    ),
    ("config-not-a-dict", lambda t: config_from_dict(["lora"]), AdapterError, "needs a 'method' key"),
    ("config-empty-targets", lambda t: LoraConfig(targets=[]), AdapterError, "`targets` is empty"),
    ("attach-missing-targets", _attach_missing_targets, AdapterError, "no module matches targets=['k_proj']"),
    ("paca-rank-larger-than-layer", _paca_rank_too_large, AdapterError, "r=9 is larger than"),
    ("load-other-base-shapes", _load_other_shape, AdapterError, "shape"),
    (
        "load-other-method-state",
        _load_other_method_state,
        AdapterError,
        "that adapter 'default' on this model does not have",
    ),
    ("load-pickle-weights", _load_pickle_weights, AdapterError, "adapter_model.pt, a pickle file"),
    ("read-pickle-named-safetensors", _read_pickle_as_safetensors, AdapterError, "not a readable safetensors file"),
    ("load-peft-format-folder", _load_peft_format_folder, AdapterError, "not a peft_core adapter config"),
    ("data-decompression-bomb", _bomb, UserError, "too large: 90,000 pixels, over the limit of 50,000"),
    (
        "data-empty-folder",
        lambda t: ImageCaptionDataset((t / "e").mkdir() or t / "e", resolution=16),
        UserError,
        "is empty",
    ),
    (
        "data-template-without-trigger",
        lambda t: validate_image_folder(good_folder(t / "i"), template="a {trigger}"),
        UserError,
        "pass a trigger exactly when",
    ),
    ("data-all-identical", lambda t: validate_image_folder(_identical(t)), UserError, "have identical pixels"),
    ("load-base-pickle", lambda t: _load_base(_pickle_file(t / "m.bin")), UserError, "pickle checkpoint (.bin)"),
]


def _identical(tmp: Path) -> Path:
    for i in range(3):
        png(tmp / "same" / f"{i}.png")
        (tmp / "same" / f"{i}.txt").write_text("same")
    return tmp / "same"


def _load_base(spec):
    from pipelines import load_base

    return load_base(spec, device="cpu")


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, tmp_path):
    _, call, error_type, words = case
    with pytest.raises(error_type) as raised:
        call(tmp_path)
    message = str(raised.value)
    assert words in message, message
    assert len(message.splitlines()) <= 3, message


# -- disk full while saving: the old file stays, no temporary is left -----------------------------------
class FullDisk:
    def __init__(self, file) -> None:
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 3])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_disk_full_during_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b'{"old": true}')
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(AdapterError, match=r"no space left to write .*state.json .*free some disk space"):
        atomic_write_bytes(target, b'{"new": true, "padding": "' + b"x" * 1000 + b'"}')
    assert target.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_disk_full_while_saving_an_adapter_keeps_the_saved_one(tmp_path, monkeypatch):
    handle = attach(TwoLayers(), LoraConfig(targets=["q_proj"], r=2))
    folder = handle.save(tmp_path / "adapter")
    saved = {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(1.0)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(AdapterError, match="no space left"):
        handle.save(folder)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))} == saved
    load(TwoLayers(), folder)  # still a whole adapter


# -- odd but valid images: they must work -------------------------------------------------------------
def _exif_rotated(path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(path, exif=exif)


def test_exif_rotation_and_alpha_images_train_as_displayed(tmp_path):
    root = good_folder(tmp_path / "images")
    _exif_rotated(root / "rotated.jpg")
    (root / "rotated.txt").write_text("rotated")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (8, 8, 24, 24))
    rgba.save(root / "alpha.png")
    (root / "alpha.txt").write_text("alpha")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 255] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    (root / "palette.txt").write_bytes("\ufeffpalette with a BOM".encode())

    report = validate_image_folder(root)
    sizes = {r.path.name: r.size for r in report.records}
    assert sizes["rotated.jpg"] == (20, 40)  # displayed upright: EXIF applied
    assert {r.path.name: r.prompt for r in report.records}["palette.png"] == "palette with a BOM"

    dataset = ImageCaptionDataset(root, resolution=16)
    items = {Path(dataset[i]["path"]).name: dataset[i]["pixel_values"] for i in range(len(dataset))}
    alpha = items["alpha.png"]
    assert torch.allclose(alpha[:, 0, 0], torch.ones(3))  # transparent corner composited on white
    assert alpha[1, 8, 8] > 0.5 and alpha[0, 8, 8] < 0 and alpha[2, 8, 8] < 0  # opaque centre stays green
    assert torch.allclose(items["palette.png"][:, 0, 0], torch.ones(3))
    rotated = items["rotated.jpg"]
    assert rotated[2, 2, 8] > 0.5 and rotated[0, 14, 8] > 0.5  # blue on top after rotation, red below
    assert all(item.shape == (3, 16, 16) and np.isfinite(item.numpy()).all() for item in items.values())


def test_catalogue_is_large_enough(tmp_path):
    assert len(CLI_CASES) >= 80 and len(CLI_CASES) + len(API_CASES) + 3 >= 100
    assert len({case[0] for case in CLI_CASES}) == len(CLI_CASES)  # one id per case
    commands = set()
    for index, case in enumerate(CLI_CASES):
        (tmp_path / str(index)).mkdir()
        commands.add(case[1](tmp_path / str(index))[0])
    from studio.cli import subcommands

    assert commands == set(subcommands()), set(subcommands()) - commands  # every command has bad inputs here
