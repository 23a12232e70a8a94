"""`studio chat` / `studio.llm.generate_text`, and the clean STOP-file stop of `studio train-llm`,
on the embedded tiny LM (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.base import embedded_lm_data
from pipelines.errors import UserError
from studio.cli import main
from studio.llm import generate_text, load_for_generation

QUESTION = "bexa has 8 cheese and buys 2 more . how many cheese does bexa have ?"


@pytest.fixture(scope="module")
def small_train(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(embedded_lm_data("task_add_train.jsonl").read_text().splitlines()[:32]) + "\n")
    return path


def train_argv(runs: Path, data: Path, steps: int, *flags: str) -> list[str]:
    return [
        "train-llm",
        str(data),
        "--runs-dir",
        str(runs),
        "--name",
        "chat",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--warmup-steps",
        "1",
        "--checkpoint-every",
        "100",
        "--cpu",
        *flags,
    ]


def greedy_without_cache(model, input_ids: torch.Tensor, new_tokens: int, eos: int) -> list[int]:
    """The reference: argmax of a full forward per token (no KV cache, no generate())."""
    ids, out = input_ids, []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_the_base_recalls_its_pretraining_facts():
    model, tokenizer = load_for_generation(None, device="cpu")
    # knowledge_probe.jsonl: "mira lives in" -> choice 9, "jarro" (the base scores 1.0 on the probe).
    assert generate_text(model, tokenizer, "mira lives in", max_new_tokens=4, chat=False).split()[0] == "jarro"
    with pytest.raises(UserError, match="write a prompt"):
        generate_text(model, tokenizer, "  ")
    with pytest.raises(UserError, match="temperature"):
        generate_text(model, tokenizer, "mira", temperature=-1)


def test_chat_with_a_trained_run_is_greedy_decoding_of_base_plus_adapter(tmp_path, small_train, capsys):
    assert main(train_argv(tmp_path / "runs", small_train, 2)) == 0
    run_dir = tmp_path / "runs" / "chat"
    model, tokenizer = load_for_generation(run_dir, device="cpu")
    assert any("lora" in type(m).__name__.lower() for m in model.modules())  # the adapter is in
    reply = generate_text(model, tokenizer, QUESTION, max_new_tokens=6)
    # The same reply from a plain argmax loop over the chat-rendered prompt: generate() with its KV
    # cache runs the adapter layers correctly, and the prompt is rendered as in training.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = torch.tensor([tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token)).input_ids])
    expected = greedy_without_cache(model, prompt_ids, 6, tokenizer.eos_token_id)
    assert reply == tokenizer.decode(expected, skip_special_tokens=True).strip()
    sampled = [generate_text(model, tokenizer, "mira", temperature=1.0, seed=seed, chat=False) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # sampling is reproducible from its seed

    out = tmp_path / "replies.json"
    assert main(["chat", str(run_dir), "--prompt", QUESTION, "--max-new-tokens", "6", "--cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["replies"] == [{"prompt": QUESTION, "reply": reply}]
    assert f"> {QUESTION}\n{reply}" in capsys.readouterr().out


def test_chat_refuses_runs_it_cannot_talk_to(tmp_path):
    from studio.runs import Run

    style = Run.create(tmp_path, "style", kind="train-style", config={})
    with pytest.raises(UserError, match="not a `studio train-llm` run"):
        load_for_generation(style.directory)
    unfinished = Run.create(tmp_path, "llm", kind="train-llm", config={})
    with pytest.raises(UserError, match="no final adapter"):
        load_for_generation(unfinished.directory)


def test_a_stop_file_checkpoints_and_resume_finishes(tmp_path, small_train, monkeypatch):
    """What the UI's cancel does: <run>/STOP -> checkpoint of that step, exit 130, 'interrupted', resumable."""
    from pipelines.train import STOP_FILE
    from studio.progress import ProgressPrinter

    original = ProgressPrinter.__call__

    def stop_after_step_2(self, event):
        original(self, event)
        if event.kind == "step" and event.step == 2:
            (tmp_path / "runs" / "chat" / STOP_FILE).touch()

    monkeypatch.setattr(ProgressPrinter, "__call__", stop_after_step_2)
    assert main(train_argv(tmp_path / "runs", small_train, 4)) == 130
    run_dir = tmp_path / "runs" / "chat"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted" and info["step"] == 2
    assert (run_dir / "checkpoints" / "step-00000002").is_dir() and not (run_dir / STOP_FILE).exists()
    monkeypatch.setattr(ProgressPrinter, "__call__", original)
    assert main(["train-llm", "--resume", str(run_dir)]) == 0
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "logs" / "events.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "step"
    ]
    assert steps == [1, 2, 3, 4] and json.loads((run_dir / "run.json").read_text())["status"] == "finished"
