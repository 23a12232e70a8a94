"""`studio train-llm` end to end on the embedded tiny LM (CPU): every method, resume, PEFT export, bad input, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.base import embedded_lm_data
from studio.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """48 training rows and 24 test rows of the embedded addition task."""
    folder = tmp_path_factory.mktemp("data")
    for name, source, count in (("train.jsonl", "task_add_train.jsonl", 48), ("test.jsonl", "task_add_test.jsonl", 24)):
        lines = embedded_lm_data(source).read_text().splitlines()[:count]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl", folder / "test.jsonl"


def train(tmp_path: Path, small_data, *flags: str, steps: int = 3) -> Path:
    train_file, test_file = small_data
    code = main(
        [
            "train-llm",
            str(train_file),
            "--eval",
            str(test_file),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--steps",
            str(steps),
            "--batch-size",
            "4",
            "--warmup-steps",
            "1",
            "--cpu",
            *flags,
        ]
    )
    assert code == 0
    runs = sorted((tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return runs[-1]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text().splitlines()]


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


METHODS = {
    "lora": [],
    "paca": [],
    "plp": [],
    "corda": ["--calibration-examples", "8"],
    "corda_kpm": ["--method", "corda", "--set", "mode=kpm", "--calibration-examples", "8"],
    "spt": ["--set", "budget=2000", "--set", "n_batches=2", "--calibration-examples", "8"],
    "compacter": ["--set", "n=2"],
    "loram_lora": ["--method", "lora", "--loram-ratio", "0.5"],
    "loram_paca": ["--method", "paca", "--loram-ratio", "0.5"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_through_the_cli_and_reloads(method, tmp_path, small_data):
    from peft_core import load
    from pipelines import load_embedded_lm

    flags = METHODS[method]
    if "--method" not in flags:
        flags = ["--method", method, *flags]
    run_dir = train(tmp_path, small_data, *flags)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 3 and info["trainable_params"] > 0
    assert set(info["after"]) == {"test/loss", "test/perplexity", "test/accuracy"}
    losses = [e["loss"] for e in events(run_dir) if e["kind"] == "step"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # The saved adapter (LoRAM: recovered to the full shapes) loads on a fresh full model and
    # reproduces the "after" loss the trainer measured.
    from studio.llm import LlmTrainConfig, evaluate, load_eval_set

    model, tokenizer = load_embedded_lm()
    base_logits = logits_of(model, torch.tensor([[1, 5, 6, 7, 8]]))
    load(model, run_dir / "adapter" / "default")
    assert not torch.equal(logits_of(model, torch.tensor([[1, 5, 6, 7, 8]])), base_logits)
    metrics = evaluate(model, [load_eval_set(small_data[1], tokenizer, LlmTrainConfig())], tokenizer, 64, "cpu")
    assert metrics["test/loss"] == pytest.approx(info["after"]["test/loss"], rel=1e-5)


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path, small_data, monkeypatch):
    from peft_core.io import read_safetensors
    from studio.progress import ProgressPrinter

    flags = ["--set", "dropout=0.1", "--checkpoint-every", "2", "--gradient-accumulation", "2"]
    straight = train(tmp_path / "a", small_data, *flags, steps=5)

    original = ProgressPrinter.__call__

    def interrupt(self, event):
        original(self, event)
        if event.kind == "checkpoint" and event.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressPrinter, "__call__", interrupt)
    train_file, test_file = small_data
    argv = [
        "train-llm",
        str(train_file),
        "--eval",
        str(test_file),
        "--runs-dir",
        str(tmp_path / "b"),
        "--steps",
        "5",
        "--batch-size",
        "4",
        "--warmup-steps",
        "1",
        "--cpu",
        *flags,
    ]
    assert main(argv) == 130
    interrupted = next((tmp_path / "b").iterdir())
    assert json.loads((interrupted / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(ProgressPrinter, "__call__", original)
    assert main(["train-llm", "--resume", str(interrupted)]) == 0

    def curve(run_dir):
        return {e["step"]: e["loss"] for e in events(run_dir) if e["kind"] == "step"}

    assert curve(interrupted) == curve(straight)
    a = read_safetensors(straight / "adapter" / "default" / "adapter_model.safetensors")
    b = read_safetensors(interrupted / "adapter" / "default" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((interrupted / "run.json").read_text())["after"]
        == json.loads((straight / "run.json").read_text())["after"]
    )


@pytest.mark.parametrize("method", ["lora", "paca"])
def test_peft_export_loads_in_peft_with_identical_logits(method, tmp_path, small_data):
    from peft import PeftModel

    from peft_core import load
    from pipelines import load_embedded_lm

    run_dir = train(tmp_path, small_data, "--method", method, "--export-peft", "--save-merged")
    input_ids = torch.tensor([[1, 5, 9, 30, 41, 7, 3]])
    ours, _ = load_embedded_lm()
    load(ours, run_dir / "adapter" / "default")
    base, _ = load_embedded_lm()
    theirs = PeftModel.from_pretrained(base, run_dir / "peft")
    expected = logits_of(ours, input_ids)
    torch.testing.assert_close(logits_of(theirs, input_ids), expected, atol=1e-5, rtol=1e-5)
    merged, _ = load_embedded_lm(run_dir / "merged")
    torch.testing.assert_close(logits_of(merged, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_malformed_jsonl_is_reported_by_line_and_can_be_skipped(tmp_path, small_data, capsys):
    rows = small_data[0].read_text().splitlines()[:12]
    rows[1] = '{"instruction": "x", "response": '  # line 2: cut short
    rows[3] = '{"prompt": "only a prompt"}'  # line 4: nothing to learn
    rows[6] = '["not", "an", "object"]'  # line 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    argv = [
        "train-llm",
        str(bad),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--cpu",
        "--eval",
        str(small_data[1]),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "3 malformed line(s)" in err and "line 2: invalid JSON" in err and "line 4:" in err and "line 7:" in err
    assert "--skip-bad-lines" in err
    # Skipped instead, with a tiny max length: the truncations are counted.
    assert main([*argv, "--skip-bad-lines", "--max-length", "24"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 malformed line(s)" in out
    run_dir = sorted((tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    data_event = next(e for e in events(run_dir) if e["kind"] == "data")
    assert "9 rows" in data_event["message"] and "9 longer than max_length 24 were truncated" in data_event["message"]


def test_method_model_mismatch_fails_before_any_weight_loads(tmp_path, small_data, capsys):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2-config-only"  # a config and no weights: a check that loaded them would fail differently
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(folder)
    argv = ["train-llm", str(small_data[0]), "--base", str(folder), "--runs-dir", str(tmp_path / "runs"), "--cpu"]
    assert main([*argv, "--loram-ratio", "0.5"]) == 2
    assert "LoRAM supports Llama-family models" in capsys.readouterr().err
    assert main([*argv, "--targets", "q_proj"]) == 2
    assert "q_proj" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    for flags, message in (
        (["--load-in-4bit"], "needs a CUDA GPU"),
        (["--optimizer", "adamw8bit"], "needs a CUDA GPU"),
        (["--method", "spt", "--loram-ratio", "0.3"], "LoRAM recovers lora, paca"),
        (["--method", "compacter", "--save-merged"], "cannot be merged"),
    ):
        assert main(["train-llm", str(small_data[0]), "--runs-dir", str(tmp_path / "runs"), "--cpu", *flags]) == 2
        assert message in capsys.readouterr().err


def test_chat_rows_put_the_loss_on_assistant_tokens_only():
    from peft_core import LoraConfig
    from studio.llm import IGNORE, LlmJob, encode_row, load_tokenizer, tokenize

    tokenizer = load_tokenizer(LlmJob(adapter=LoraConfig(targets=["q_proj"])))
    example = encode_row({"instruction": "mira has 2 cakes", "response": "4"}, tokenizer)
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert tokenizer.convert_ids_to_tokens(learned) == ["4", "</s>"]
    chat = {
        "messages": [
            {"role": "user", "content": "how many cakes ?"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "how many soup ?"},
            {"role": "assistant", "content": "5"},
        ]
    }
    example = encode_row(chat, tokenizer)
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert tokenizer.convert_ids_to_tokens(learned) == ["3", "</s>", "5", "</s>"]
    text = encode_row({"text": "mira lives in tolva"}, tokenizer)
    assert text.labels == text.input_ids
    packed = tokenize([{"text": "mira lives in tolva"}] * 5, tokenizer, max_length=8, packing=True)
    assert [len(e.input_ids) for e in packed.examples] == [8, 8, 8, 6]  # 5 x (<s> + 4 words + </s>) = 30 tokens


def test_two_processes_follow_the_one_process_loss_curve(tmp_path, small_data):
    """Two CPU processes (gloo, DDP) with batch 2 each == one process with batch 4.

    `accelerate launch --cpu` starts several processes only through MPI; torchrun (`--multi_gpu`) starts
    them anywhere, and the trainer's own --cpu makes accelerate pick MULTI_CPU (gloo)."""
    train_file, test_file = small_data
    common = [
        str(train_file),
        "--eval",
        str(test_file),
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--cpu",
        "--method",
        "paca",
        "--checkpoint-every",
        "100",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "studio.cli",
            "train-llm",
            *common,
            "--batch-size",
            "2",
            "--runs-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "MULTI_CPU" in launched.stdout
    assert main(["train-llm", *common, "--batch-size", "4", "--runs-dir", str(tmp_path / "one")]) == 0

    def curve(root):
        run_dir = next(root.iterdir())
        return [e["loss"] for e in events(run_dir) if e["kind"] == "step"]

    two, one = curve(tmp_path / "two"), curve(tmp_path / "one")
    assert len(two) == len(one) == 4
    # Same examples, same normalisation; only float reduction order differs (padding widths, all-reduce).
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-4, rtol=1e-4)


def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients():
    """float64 reference: the whole logits matrix at once; chunked: a few tokens at a time, recomputed."""
    from studio.llm import IGNORE, chunked_token_loss_sum

    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 29, bias=False, dtype=torch.float64)
    targets = torch.randint(0, 29, (3, 11))
    targets[0, :4] = IGNORE  # a prompt without loss
    targets[2, -3:] = IGNORE  # padding
    reference = torch.nn.functional.cross_entropy(
        head(hidden).reshape(-1, 29), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    reference_grads = torch.autograd.grad(reference, (hidden, head.weight))
    for chunk in (1, 4, 7, 1000):
        chunked = chunked_token_loss_sum(hidden, head, targets, chunk)
        grads = torch.autograd.grad(chunked, (hidden, head.weight))
        torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-10)
        for got, want in zip(grads, reference_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_loss_chunk_tokens_trains_like_the_plain_loss(tmp_path, small_data):
    plain = train(tmp_path / "plain", small_data, "--method", "lora")
    chunked = train(tmp_path / "chunked", small_data, "--method", "lora", "--loss-chunk-tokens", "8")
    plain_losses = [e["loss"] for e in events(plain) if e.get("kind") == "step"]
    chunked_losses = [e["loss"] for e in events(chunked) if e.get("kind") == "step"]
    assert len(plain_losses) == len(chunked_losses) == 3
    assert plain_losses == pytest.approx(chunked_losses, rel=1e-5)
