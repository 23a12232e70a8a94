"""The bad-input catalogue (docs/reliability.md): each bad input gets a clear error naming what was
wrong and what to do, the CLI exits 2 with no traceback and leaves no run folder, files on disk stay
whole. A few inputs that look odd but are fine (EXIF rotation, alpha) must simply work."""

from __future__ import annotations

import errno
import json
import os
import pickle
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


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, tmp_path, capsys, monkeypatch):
    _, make_argv, words, max_lines = case
    monkeypatch.chdir(tmp_path)  # generate's default --out, any stray relative path
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    runs = tmp_path / "runs"
    argv = make_argv(inputs)
    if argv[0].startswith("train-"):
        argv += ["--runs-dir", str(runs)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    message = "\n".join(line for line in err.splitlines() if line.startswith(("error:", "  - ")))
    assert code == 2, err  # main returns only for a caught UserError/AdapterError; anything else raises
    assert message.startswith("error: "), err
    assert len(message.splitlines()) <= max_lines, message
    for word in words:
        assert word in message, (word, message)
    assert not runs.exists() or not any(runs.iterdir()), f"left a run folder: {list(runs.iterdir())}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray output (generate.png, ...)


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


def test_catalogue_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) + 3 >= 30
