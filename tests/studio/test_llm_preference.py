"""`studio train-llm --objective dpo|orpo`: the losses against a float64 reference written out plainly (one
forward per response token), the reference model being the adapter-disabled base, preference rows and their
errors, exact resume, two processes == one, and the objectives with several methods."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.base import embedded_lm_data
from pipelines.errors import UserError
from studio.cli import main
from studio.llm import LlmTrainConfig, load_tokenizer
from studio.llm.data import load_rows
from studio.llm.preference import (
    collate_pairs,
    encode_pair,
    preference_loss_sum,
    reference_logps,
    sequence_logps,
    tokenize_pairs,
)

REPO = Path(__file__).resolve().parents[2]
BETA, LAMBDA = 0.3, 0.7  # not the defaults, so a wrong constant shows

# One pair of each shape: plain strings, conversational with the prompt given, conversational with the prompt
# implicit (shared leading messages, here a multi-turn history whose assistant turn must carry no loss).
ROWS = [
    {"prompt": "mira has 2 cakes and buys", "chosen": " 3 more", "rejected": " 5 more . how many"},
    {
        "prompt": [{"role": "user", "content": "bexa has 8 cheese and buys 2 more . how many cheese does bexa have ?"}],
        "chosen": [{"role": "assistant", "content": "10"}],
        "rejected": [{"role": "assistant", "content": "12 . 4"}],
    },
    {
        "chosen": [
            {"role": "user", "content": "how many cakes ?"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "how many soup does mira have ?"},
            {"role": "assistant", "content": "5 soup"},
        ],
        "rejected": [
            {"role": "user", "content": "how many cakes ?"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "how many soup does mira have ?"},
            {"role": "assistant", "content": "7"},
        ],
    },
]


@pytest.fixture(scope="module")
def tokenizer():
    from argparse import Namespace

    return load_tokenizer(Namespace(base="embedded"))


def tiny_llama(tokenizer, seed: int = 0):
    """A random 2-layer Llama over the embedded tokenizer's vocabulary, in float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float64)
    model.requires_grad_(False)
    return model


def with_adapter(model, method: str, seed: int = 1):
    """The model with a trainable adapter whose parameters are random (not the zero update of a fresh one)."""
    from peft_core import LoraConfig, PacaConfig, attach

    config = (
        LoraConfig(targets=["all-linear"], r=4, alpha=8)
        if method == "lora"
        else PacaConfig(targets=["all-linear"], r=4)
    )
    handle = attach(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return handle


def split_by_hand(row: dict, tokenizer, side: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one side, worked out without studio's encoder: the word-level tokenizer
    makes the prompt's ids a prefix of the whole sequence's."""
    if isinstance(row[side], str):
        prompt = tokenizer(row["prompt"]).input_ids
        whole = tokenizer(row["prompt"] + row[side]).input_ids + [tokenizer.eos_token_id]
    else:
        prompt_messages = row.get("prompt") or row["chosen"][:3]  # the implicit row shares three messages
        response = row[side] if "prompt" in row else row[side][3:]
        render = lambda messages, more: tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=False, add_generation_prompt=more
        )
        prompt = tokenizer(render(prompt_messages, True)).input_ids
        whole = tokenizer(render(prompt_messages + response, False)).input_ids
    assert whole[: len(prompt)] == prompt
    return prompt, whole[len(prompt) :]


def logp_by_loop(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(response | prompt): one forward per response token, each on the unpadded prefix."""
    total = torch.zeros((), dtype=torch.float64)
    for j, token in enumerate(response):
        logits = model(input_ids=torch.tensor([prompt + response[:j]])).logits[0, -1]
        total = total + torch.log_softmax(logits, -1)[token]
    return total


def reference_losses(policy, base, rows, tokenizer, objective: str) -> torch.Tensor:
    """Sum over the pairs of the objective's loss, in float64, straight from the papers' formulas."""
    total = torch.zeros((), dtype=torch.float64)
    for row in rows:
        (pw_prompt, w), (pl_prompt, l_) = (
            split_by_hand(row, tokenizer, "chosen"),
            split_by_hand(row, tokenizer, "rejected"),
        )
        policy_w, policy_l = logp_by_loop(policy, pw_prompt, w), logp_by_loop(policy, pl_prompt, l_)
        if objective == "dpo":
            with torch.no_grad():
                ref_w, ref_l = logp_by_loop(base, pw_prompt, w), logp_by_loop(base, pl_prompt, l_)
            margin = BETA * ((policy_w - ref_w) - (policy_l - ref_l))
            total = total - torch.log(torch.sigmoid(margin))
        else:
            p_w, p_l = torch.exp(policy_w / len(w)), torch.exp(policy_l / len(l_))  # length-normalised probability
            odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
            total = total + (-policy_w / len(w)) - LAMBDA * torch.log(torch.sigmoid(torch.log(odds_ratio)))
    return total


@pytest.mark.parametrize("method", ["lora", "paca"])
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_losses_and_gradients_equal_a_float64_reference(objective, method, tokenizer):
    base = tiny_llama(tokenizer)
    model = copy.deepcopy(base)
    handle = with_adapter(model, method)
    pairs = [encode_pair(load_rows_of(row), tokenizer) for row in ROWS]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)  # padded: the three pairs differ in length
    assert batch["attention_mask"].min() == 0
    parameters = handle.trainable_parameters()
    expected = reference_losses(model, base, ROWS, tokenizer, objective)
    expected_grads = torch.autograd.grad(expected, parameters)
    for chunk in (0, 2):  # the plain loss, and the output layer two tokens at a time
        train = LlmTrainConfig(objective=objective, dpo_beta=BETA, orpo_lambda=LAMBDA, loss_chunk_tokens=chunk)
        got = preference_loss_sum(model, model, handle, "default", batch, train)
        grads = torch.autograd.grad(got, parameters)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        # Llama's RMSNorm computes in float32 whatever the dtype, so the gradients (which sum the tokens'
        # contributions in another order in the loop than in the batch) agree to float32 rounding only.
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


def load_rows_of(row: dict) -> dict:
    """A raw row in the internal form, as the trainer reads it."""
    from studio.llm.data import internal_row

    return internal_row(row)


def test_only_the_response_tokens_are_scored(tokenizer):
    pairs = [encode_pair(load_rows_of(row), tokenizer) for row in ROWS]
    for row, pair in zip(ROWS, pairs):
        for side, example in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            prompt, response = split_by_hand(row, tokenizer, side)
            assert example.input_ids == prompt + response
            assert example.labels == [-100] * len(prompt) + response
    # The multi-turn row: the history's assistant turn ("3") is prompt, not response.
    assert tokenizer.convert_ids_to_tokens([t for t in pairs[2].chosen.labels if t != -100]) == ["5", "soup", "</s>"]
    # The implicit prompt equals the same row with the prompt given.
    explicit = {"prompt": ROWS[2]["chosen"][:3], "chosen": ROWS[2]["chosen"][3:], "rejected": ROWS[2]["rejected"][3:]}
    assert encode_pair(load_rows_of(explicit), tokenizer) == pairs[2]


@pytest.mark.parametrize("method", ["lora", "paca"])
def test_the_reference_is_the_base_with_the_adapter_disabled(method, tokenizer):
    base = tiny_llama(tokenizer)
    model = copy.deepcopy(base)
    handle = with_adapter(model, method)
    model.train()
    batch = collate_pairs([encode_pair(load_rows_of(row), tokenizer) for row in ROWS], tokenizer.pad_token_id)
    with torch.no_grad():
        base_logps = sequence_logps(base, batch)
        policy_before = sequence_logps(model, batch)
    reference = reference_logps(model, handle, "default", batch)
    torch.testing.assert_close(reference, base_logps, rtol=0, atol=1e-12)
    assert not torch.allclose(policy_before, base_logps)
    # Afterwards the adapter is on again and the model back in training mode.
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch), policy_before, rtol=0, atol=1e-12)
        for parameter in handle.trainable_parameters():  # another adapter: the policy moves, the reference not
            parameter.mul_(-3.0).add_(0.1)
        policy_after = sequence_logps(model, batch)
    assert not torch.allclose(policy_after, policy_before)
    torch.testing.assert_close(reference_logps(model, handle, "default", batch), base_logps, rtol=0, atol=1e-12)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_malformed_preference_rows_are_refused_by_line(tmp_path, capsys):
    user = {"role": "user", "content": "how many cakes ?"}
    good = {"prompt": "mira has", "chosen": " 3", "rejected": " 4"}
    rows = [
        good,
        {"prompt": "mira has", "chosen": " 3"},  # 2: no rejected
        {"prompt": "mira has", "chosen": 3, "rejected": " 4"},  # 3: not a string
        {"chosen": " 3", "rejected": " 4"},  # 4: strings need the prompt
        {"prompt": "mira has", "chosen": " 3", "rejected": " 3"},  # 5: nothing to prefer
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},  # 6
        {"chosen": [user, {"role": "assistant", "content": "3"}], "rejected": [user]},  # 7: no rejected response
        {
            "prompt": [user],
            "chosen": [{"role": "user", "content": "3"}],
            "rejected": [{"role": "assistant", "content": "4"}],
        },
        {"prompt": "mira has", "chosen": [{"role": "assistant", "content": "3"}], "rejected": " 4"},  # 9: mixed
        {"prompt": "mira has", "completion": " 3"},  # 10: another format
        '{"prompt": "cut short", "chosen": ',  # 11
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    problems = dict(load_rows(path).problems)
    assert problems.pop("line 11").startswith("invalid JSON")
    assert problems == {
        "line 2": 'a preference row needs "rejected" next to "chosen" (missing)',
        "line 3": '"chosen" and "rejected" must both be strings, or both lists of messages',
        "line 4": '"prompt" must be a string (missing)',
        "line 5": '"chosen" and "rejected" are the same: nothing to prefer',
        "line 6": '"chosen" and "rejected" share no leading (prompt) messages; give the "prompt" messages',
        "line 7": '"rejected" has no response after the prompt',
        "line 8": '"chosen" response message 1 has role "user": the responses after the prompt must be assistant '
        "messages",
        "line 9": '"chosen" and "rejected" must both be strings, or both lists of messages',
        "line 10": 'no "chosen" field (has completion, prompt): this file holds preference rows (detected from line 1)',
    }
    argv = ["train-llm", str(path), "--objective", "dpo", "--runs-dir", str(tmp_path / "runs"), "--cpu", "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "10 malformed line(s)" in err and "line 2:" in err and "line 11:" in err
    assert not (tmp_path / "runs").exists()
    # The wrong kind of data for the objective, either way round, and packing: one line each, before any run.
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "mira has", "completion": " 3"}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [good])
    for flags, message in (
        ([str(sft_rows), "--objective", "orpo"], "trains on preference rows"),
        ([str(pairs)], "holds preference rows (prompt / chosen / rejected): train them with --objective dpo or orpo"),
        ([str(pairs), "--objective", "dpo", "--packing"], "--packing"),
    ):
        assert main(["train-llm", *flags, "--runs-dir", str(tmp_path / "runs"), "--cpu"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_shipped_preference_files_come_from_the_task_files_and_the_base_models_mistakes():
    from pipelines.base import load_embedded_lm
    from pipelines.world import text as world

    model, tokenizer = load_embedded_lm()
    for split, count in world.PREFERENCE_COUNTS.items():
        pairs = [
            json.loads(line) for line in embedded_lm_data(f"preference_add_{split}.jsonl").read_text().splitlines()
        ]
        task = [
            json.loads(line) for line in embedded_lm_data(f"task_add_{split}.jsonl").read_text().splitlines()[:count]
        ]
        assert [p["prompt"][0]["content"] for p in pairs] == [t["instruction"] for t in task]
        assert [p["chosen"][0]["content"] for p in pairs] == [t["response"] for t in task]
        # rejected: the wrong sum the shipped base scores highest, recomputed here by brute force over 0..18
        for pair, row in zip(pairs, task):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["instruction"]}], tokenize=False, add_generation_prompt=True
            )
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1].double()
            wrong = [n for n in range(19) if n != row["answer"]]
            scores = [float(logits[tokenizer.convert_tokens_to_ids(str(n))]) for n in wrong]
            assert int(pair["rejected"][0]["content"]) == wrong[scores.index(max(scores))]
        assert pairs == world.addition_preferences(split, count, world.model_mistakes(model, tokenizer, task))


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """32 training pairs and 16 held-out pairs of the embedded preference set."""
    folder = tmp_path_factory.mktemp("pairs")
    for name, source, count in (
        ("train.jsonl", "preference_add_train.jsonl", 32),
        ("test.jsonl", "preference_add_test.jsonl", 16),
    ):
        lines = embedded_lm_data(source).read_text().splitlines()[:count]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl", folder / "test.jsonl"


def common_flags(small_pairs, runs: Path, steps: int) -> list[str]:
    train_file, test_file = small_pairs
    return [
        str(train_file),
        "--eval",
        str(test_file),
        "--runs-dir",
        str(runs),
        "--steps",
        str(steps),
        "--warmup-steps",
        "1",
        "--cpu",
    ]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[float]:
    return [e["loss"] for e in events(run_dir) if e["kind"] == "step"]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from peft_core.io import read_safetensors

    return read_safetensors(run_dir / "adapter" / "default" / "adapter_model.safetensors")


COMBINATIONS = {
    "dpo-lora": ["--objective", "dpo", "--method", "lora"],
    "dpo-paca": ["--objective", "dpo", "--method", "paca"],
    "orpo-lora": ["--objective", "orpo", "--method", "lora"],
    "orpo-paca": ["--objective", "orpo", "--method", "paca"],
    "dpo-corda": ["--objective", "dpo", "--method", "corda", "--calibration-examples", "8"],
    "dpo-loram": ["--objective", "dpo", "--method", "lora", "--loram-ratio", "0.5"],
    "dpo-spt": ["--objective", "dpo", "--method", "spt", "--set", "budget=2000", "--set", "n_batches=2"],
    "dpo-plp": ["--objective", "dpo", "--method", "plp"],
    "orpo-compacter": ["--objective", "orpo", "--method", "compacter", "--set", "n=2"],
}


@pytest.mark.filterwarnings("ignore:corda")  # CorDA on a few calibration tokens: rank-deficient covariances
@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_objectives_train_with_each_method_and_reload(name, tmp_path, small_pairs):
    from peft_core import get_method, load
    from pipelines import load_embedded_lm
    from studio.llm import evaluate, load_eval_set

    assert main(["train-llm", *common_flags(small_pairs, tmp_path, 3), "--batch-size", "4", *COMBINATIONS[name]]) == 0
    run_dir = next(tmp_path.iterdir())
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 3
    assert set(info["after"]) == {"test/preference_accuracy", "test/preference_margin"}
    losses = curve(run_dir)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    method = COMBINATIONS[name][COMBINATIONS[name].index("--method") + 1]
    if "dpo" in name and get_method(method).capabilities.identity_at_init:
        assert losses[0] == pytest.approx(0.6931472, abs=1e-6)  # the policy starts at the reference: -log sigmoid(0)
    model, tokenizer = load_embedded_lm()
    load(model, run_dir / "adapter" / "default")
    metrics = evaluate(model, [load_eval_set(small_pairs[1], tokenizer, LlmTrainConfig())], tokenizer, 64, "cpu")
    assert metrics["test/preference_margin"] == pytest.approx(info["after"]["test/preference_margin"], rel=1e-5)


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path, small_pairs, monkeypatch):
    from studio.progress import ProgressPrinter

    flags = ["--objective", "dpo", "--batch-size", "4", "--set", "dropout=0.1", "--checkpoint-every", "2"]
    flags += ["--gradient-accumulation", "2"]
    assert main(["train-llm", *common_flags(small_pairs, tmp_path / "a", 5), *flags]) == 0
    straight = next((tmp_path / "a").iterdir())

    original = ProgressPrinter.__call__

    def interrupt(self, event):
        original(self, event)
        if event.kind == "checkpoint" and event.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressPrinter, "__call__", interrupt)
    assert main(["train-llm", *common_flags(small_pairs, tmp_path / "b", 5), *flags]) == 130
    interrupted = next((tmp_path / "b").iterdir())
    monkeypatch.setattr(ProgressPrinter, "__call__", original)
    assert main(["train-llm", "--resume", str(interrupted)]) == 0
    assert curve(interrupted) == curve(straight)
    a, b = adapter_tensors(straight), adapter_tensors(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((interrupted / "run.json").read_text())["after"]
        == json.loads((straight / "run.json").read_text())["after"]
    )


def test_two_processes_follow_the_one_process_dpo_run(tmp_path, small_pairs):
    """Two CPU processes (gloo, DDP) with 1 pair each == one process with 2 pairs: the loss curve and the final
    adapter (PaCA: its resident columns are swapped out and back for every reference pass)."""
    flags = ["--objective", "dpo", "--method", "paca", "--checkpoint-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio.cli"]
    launched = subprocess.run(
        [*launch, "train-llm", *common_flags(small_pairs, tmp_path / "two", 4), "--batch-size", "1", *flags],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "MULTI_CPU" in launched.stdout
    assert main(["train-llm", *common_flags(small_pairs, tmp_path / "one", 4), "--batch-size", "2", *flags]) == 0
    two, one = next((tmp_path / "two").iterdir()), next((tmp_path / "one").iterdir())
    assert len(curve(two)) == len(curve(one)) == 4
    torch.testing.assert_close(torch.tensor(curve(two)), torch.tensor(curve(one)), atol=1e-5, rtol=1e-5)
    assert curve(one)[-1] != curve(one)[0]  # it trained
    a, b = adapter_tensors(two), adapter_tensors(one)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # PaCA's chosen columns
    # Adam divides every gradient entry by its own running magnitude, so the few entries whose gradient is a
    # near-exact cancellation (chosen and rejected share all but their number token) move by float-noise-
    # sized amounts of either sign, up to a learning rate per step; all the others agree to float tolerance,
    # and the adapter as a whole to 1e-3 (a process that skipped the gradient average would be off by O(1)).
    floats = [k for k in a if a[k].is_floating_point()]
    difference = torch.cat([(a[k] - b[k]).flatten() for k in floats])
    reference = torch.cat([b[k].flatten() for k in floats])
    assert difference.norm() <= 1e-3 * reference.norm()
    assert (difference.abs() > 1e-6).sum() <= 1e-3 * difference.numel()


def test_pairs_are_truncated_and_dropped_like_sft_rows(tokenizer):
    rows = [load_rows_of(row) for row in ROWS]
    data = tokenize_pairs(rows, tokenizer, max_length=12)
    assert (data.rows, data.truncated) == (3, 3)
    assert all(len(p.chosen.input_ids) <= 12 and len(p.rejected.input_ids) <= 12 for p in data.examples)
    assert data.dropped == 3 - len(data.examples) and data.dropped >= 1  # the chat prompts alone exceed 12 tokens
    with pytest.raises(UserError, match="no preference pair has response tokens on both sides within max_length 4"):
        tokenize_pairs(rows, tokenizer, max_length=4)
