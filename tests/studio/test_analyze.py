"""`studio analyze` end to end on the embedded tiny LM and tiny SD, with a saved adapter on top."""

from __future__ import annotations

import json

import torch

from peft_core import LoraConfig, attach
from studio.cli import main


def _save_random_lora(model, targets, directory):
    torch.manual_seed(0)
    handle = attach(model, LoraConfig(targets=targets, r=2, alpha=4))
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return handle.save(directory)


def _check_outputs(out, heads, capsys):
    printed = capsys.readouterr().out
    assert "rho" in printed and "report.json" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["heads"] == heads == len(report["heads"])
    assert report["adapter"] == "known"
    assert all(
        head["gamma_q_adapter"] > 0 and head["label"] in ("low-rank", "transition", "exact") for head in report["heads"]
    )
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def test_analyze_embedded_lm_with_adapter(tmp_path, capsys):
    from pipelines import load_embedded_lm

    model, _ = load_embedded_lm()
    adapter = _save_random_lora(model, ["q_proj", "k_proj", "v_proj"], tmp_path / "adapter")
    out = tmp_path / "lm"
    code = main(
        [
            "analyze",
            "--model",
            "embedded-lm",
            "--adapter",
            str(adapter),
            "--batches",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = _check_outputs(out, 16, capsys)  # 4 layers x 4 heads
    assert report["metadata"]["seq_len"] == 64 and report["batches"] == 2
    assert all(head["key_length"] == 64 for head in report["heads"])


def test_analyze_embedded_sd_with_adapter(tmp_path, capsys):
    from pipelines import load_base

    pipe = load_base(device="cpu")
    adapter = _save_random_lora(pipe.unet, ["to_q", "to_k"], tmp_path / "adapter")
    out = tmp_path / "sd"
    code = main(
        [
            "analyze",
            "--model",
            "embedded-sd",
            "--adapter",
            str(adapter),
            "--batches",
            "1",
            "--batch-size",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = _check_outputs(out, 14 * 8, capsys)  # 7 self + 7 cross attention modules, 8 heads each
    kinds = {head["kind"] for head in report["heads"]}
    assert kinds == {"self", "cross"}
    assert {head["key_length"] for head in report["heads"] if head["kind"] == "cross"} == {32}  # text tokens
    assert report["metadata"]["prompts"][0].startswith("a ")


def test_analyze_refuses_unknown_hub_kind(tmp_path, capsys):
    assert main(["analyze", "--model", "someone/some-model", "--out", str(tmp_path)]) == 2
    assert "--kind lm or --kind sd" in capsys.readouterr().err
