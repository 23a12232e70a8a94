"""LLM data formats (messages, ShareGPT, Alpaca, prompt-completion, text) from JSONL, JSON, CSV, Parquet and
hub ids: detection, the loss mask each gets, one-line errors by line / row, and `studio data check`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from pipelines.base import embedded_lm_data
from pipelines.errors import UserError
from studio.cli import main
from studio.llm.data import IGNORE, encode_row, encode_rows, fit_length, load_rows, read_data, tokenize
from studio.llm.model import load_tokenizer

CHAT = [
    {"role": "user", "content": "how many cakes ?"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "how many soup ?"},
    {"role": "assistant", "content": "5"},
]
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "how many cakes ?"},
        {"from": "gpt", "value": "3"},
        {"from": "human", "value": "how many soup ?"},
        {"from": "gpt", "value": "5"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(argparse.Namespace(base="embedded"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def learned(example, tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(
        [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    )


def only_example(path: Path, tokenizer, data_format: str = "auto"):
    data = load_rows(path, data_format)
    assert not data.problems, data.problems
    return data, encode_rows(data.rows, tokenizer)[0]


def test_every_format_is_detected_and_gets_its_loss_mask(tmp_path, tokenizer):
    messages, chat = only_example(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), tokenizer)
    assert (messages.format, messages.detected_from) == ("messages", "line 1")
    assert learned(chat, tokenizer) == ["3", "</s>", "5", "</s>"]

    sharegpt, same = only_example(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT]), tokenizer)
    assert sharegpt.format == "sharegpt" and sharegpt.rows == [{"messages": CHAT}]
    assert (same.input_ids, same.labels) == (chat.input_ids, chat.labels)

    # Alpaca: "output" (or the older "response"), "input" appended to the instruction, optional "system".
    alpaca, example = only_example(
        write_jsonl(tmp_path / "a.jsonl", [{"instruction": "mira has 2 cakes", "input": "", "output": "4"}]), tokenizer
    )
    assert alpaca.format == "alpaca" and learned(example, tokenizer) == ["4", "</s>"]
    legacy = encode_row({"instruction": "mira has 2 cakes", "response": "4"}, tokenizer)
    assert (legacy.input_ids, legacy.labels) == (example.input_ids, example.labels)
    full = load_rows(
        write_jsonl(
            tmp_path / "a2.jsonl", [{"system": "be brief", "instruction": "add", "input": "2 2", "output": "4"}]
        )
    )
    assert full.rows == [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "add\n2 2"},
                {"role": "assistant", "content": "4"},
            ]
        }
    ]

    # Prompt-completion: plain text, the loss on the completion (and EOS) only.
    pc, example = only_example(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "mira lives in", "completion": " tolva"}]), tokenizer
    )
    assert pc.format == "prompt-completion"
    assert tokenizer.convert_ids_to_tokens(example.input_ids) == ["<s>", "mira", "lives", "in", "tolva", "</s>"]
    assert learned(example, tokenizer) == ["tolva", "</s>"]
    conversational = {"prompt": CHAT[:3], "completion": CHAT[3:]}  # TRL's conversational prompt-completion
    _, example = only_example(write_jsonl(tmp_path / "pc.jsonl", [conversational]), tokenizer)
    assert (example.input_ids, example.labels) == (chat.input_ids, chat.labels)

    text, example = only_example(write_jsonl(tmp_path / "t.jsonl", [{"text": "mira lives in tolva"}]), tokenizer)
    assert text.format == "text" and example.labels == example.input_ids  # continued pretraining: every token


def test_format_is_per_file_and_format_overrides_it(tmp_path, tokenizer):
    # Alpaca dumps often carry a pre-rendered "text" column: detection prefers the instruction fields...
    path = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "add 2 2", "output": "4", "text": "mira lives in tolva"}] * 2
    )
    data, example = only_example(path, tokenizer)
    assert data.format == "alpaca" and learned(example, tokenizer) == ["4", "</s>"]
    # ...and --format text trains on the text instead.
    data, example = only_example(path, tokenizer, "text")
    assert (data.format, data.detected_from, data.describe_format()) == ("text", None, "text (--format)")
    assert example.labels == example.input_ids and len(example.input_ids) == 6
    # One format per file: a row of another format is malformed, named by line.
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "add", "output": "4"}, {"text": "mira"}])
    with pytest.raises(UserError) as error:
        read_data(mixed)
    assert 'line 2: no "instruction" field (has text): this file holds alpaca rows (detected from line 1)' in str(
        error.value
    )
    with pytest.raises(UserError, match="unknown data format 'chatml'"):
        load_rows(mixed, "chatml")


def test_sharegpt_tool_turns_are_refused_by_line_and_role(tmp_path, capsys):
    tool = {
        "conversations": [
            {"from": "human", "value": "weather ?"},
            {"from": "function_call", "value": '{"name": "weather"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "sunny"},
        ]
    }
    odd = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}
    path = write_jsonl(tmp_path / "sg.jsonl", [SHAREGPT, tool, SHAREGPT, odd])
    argv = ["train-llm", str(path), "--runs-dir", str(tmp_path / "runs"), "--steps", "1", "--cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert 'line 2: "conversations" turn 2 has role "function_call": tool / function-calling turns' in err
    assert 'line 4: "conversations" turn 1 has unknown role "narrator" (expected system, human or gpt)' in err
    assert "2 malformed line(s)" in err and not (tmp_path / "runs").exists()


ROWS = [
    {"instruction": "mira has 2 cakes and buys 1 more", "input": "", "output": "3"},
    {"instruction": "add", "input": "2 and 2", "output": "4"},
]


def test_json_csv_and_parquet_read_like_jsonl(tmp_path, monkeypatch):
    expected = load_rows(write_jsonl(tmp_path / "rows.jsonl", ROWS)).rows
    (tmp_path / "rows.json").write_text(json.dumps(ROWS, indent=2))
    csv_text = "instruction,input,output\n" + "".join(
        f'"{r["instruction"]}",{r["input"]},{r["output"]}\n' for r in ROWS
    )
    (tmp_path / "rows.csv").write_text(csv_text)
    for name in ("rows.json", "rows.csv"):
        data = load_rows(tmp_path / name)
        assert (data.format, data.rows, data.problems) == ("alpaca", expected, []), name
    # CSV cells are text as written: no number or "NA" guessing.
    (tmp_path / "odd.csv").write_text("prompt,completion\nNone,007\n")
    assert load_rows(tmp_path / "odd.csv").rows == [{"prompt": "None", "response": "007"}]
    # CSV without the datasets library: the standard library reads it the same way.
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert load_rows(tmp_path / "rows.csv").rows == expected
    assert load_rows(tmp_path / "odd.csv").rows == [{"prompt": "None", "response": "007"}]
    monkeypatch.undo()

    pandas = pytest.importorskip("pandas")
    pytest.importorskip("datasets")
    pandas.DataFrame([SHAREGPT, SHAREGPT]).to_parquet(tmp_path / "chats.parquet")
    data = load_rows(tmp_path / "chats.parquet")
    assert (data.format, data.detected_from, data.rows) == ("sharegpt", "row 1", [{"messages": CHAT}] * 2)
    # Messages in a CSV cell are JSON text; a missing cell is a missing field.
    (tmp_path / "chat.csv").write_text('messages,other\n"' + json.dumps(CHAT).replace('"', '""') + '",\n')
    assert load_rows(tmp_path / "chat.csv").rows == [{"messages": CHAT}]


def test_malformed_rows_of_json_and_csv_are_named_by_row(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([ROWS[0], {"instruction": 3, "output": "x"}, ROWS[1], "oops"]))
    with pytest.raises(UserError) as error:
        read_data(tmp_path / "bad.json")
    message = str(error.value)
    assert '2 malformed row(s): row 2: "instruction" must be a string; row 4: expected a JSON object' in message
    assert "--skip-bad-lines" in message and "\n" not in message
    assert len(read_data(tmp_path / "bad.json", skip_bad_lines=True).rows) == 2
    (tmp_path / "cut.json").write_text('[{"text": "a"},\n {"text": ')
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        read_data(tmp_path / "cut.json")
    (tmp_path / "bad.csv").write_text("prompt,completion\nmira lives in, tolva\nmira works as a,\n")
    with pytest.raises(UserError, match=r'row 2: a "prompt" row needs a "completion"'):
        read_data(tmp_path / "bad.csv")
    # A .json file holding one object a line is read as JSONL.
    write_jsonl(tmp_path / "lines.json", ROWS)
    assert load_rows(tmp_path / "lines.json").unit == "line"


def test_a_hub_dataset_id_goes_to_datasets_and_offline_is_one_line(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "mira lives in", "completion": " tolva"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_rows("someone/tiny-set")
    assert calls == [("someone/tiny-set", "train")]
    assert (data.format, data.rows, data.unit) == (
        "prompt-completion",
        [{"prompt": "mira lives in", "response": " tolva"}],
        "row",
    )
    monkeypatch.undo()

    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as error:
        load_rows("someone/not-downloaded")
    message = str(error.value)
    assert "someone/not-downloaded is not a local file" in message and "hub dataset" in message
    assert "offline?" in message and "\n" not in message
    with pytest.raises(UserError, match="does not exist"):  # a file name, not an id
        load_rows(str(tmp_path / "nope" / "train.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_rows("nope/train.jsonl")


def test_data_check_reports_rows_format_lengths_truncation_and_the_loss_mask(tmp_path, tokenizer, capsys):
    source = embedded_lm_data("task_add_train.jsonl").read_text().splitlines()[:20]
    rows = [json.loads(line) for line in source]
    rows[3]["instruction"] = " ".join(["mira has 2 cakes ."] * 8) + " " + rows[3]["instruction"]  # a long one
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["data", "check", str(path), "--max-length", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 20 usable rows, format alpaca (detected from line 1)"
    lengths = sorted(len(e.input_ids) for e in encode_rows(load_rows(path).rows, tokenizer))
    p50, p90, top = lengths[9], lengths[17], lengths[19]  # nearest rank of 20
    assert out[1] == f"tokens per row (embedded tokenizer): p50 {p50}, p90 {p90}, p99 {top}, max {top}"
    # The trainer's own counts for the same max_length.
    trained = tokenize(load_rows(path).rows, tokenizer, 30)
    assert out[2] == (
        f"max_length 30: {trained.truncated} row(s) would be truncated, {trained.dropped} dropped "
        f"(no response token left), {len(trained.examples)} train"
    )
    assert trained.truncated == 1 and trained.dropped == 1
    assert out[3].startswith("first example (") and out[3].endswith(" tokens, 2 with loss):")
    assert out[4].startswith('  loss: no  | "<s> ### instruction : rusa has 4 cakes')
    assert out[5] == '  loss: yes | "9 </s>"'
    # `studio data FILE` is `studio data check FILE`; malformed rows are listed and the exit code is 1.
    lines = path.read_text().splitlines()
    lines[1] = '{"instruction": "x", "output": '
    path.write_text("\n".join(lines) + "\n")
    assert main(["data", str(path), "--format", "alpaca"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("19 usable rows, format alpaca (--format)")
    assert out[1].startswith("1 malformed line(s): line 2: invalid JSON")
    assert main(["data", "check"]) == 2
    assert "give the data to check" in capsys.readouterr().err


def test_data_check_uses_the_trainers_truncation_rule(tokenizer):
    rows = [{"prompt": "mira lives in " * 10, "completion": " tolva"}, {"text": "mira lives in tolva"}]
    examples = encode_rows([rows[0]], tokenizer) + encode_rows([rows[1]], tokenizer)
    kept, truncated, dropped = fit_length(examples, 8)
    assert (len(kept), truncated, dropped) == (1, 1, 1)  # the long prompt loses its completion: dropped


def test_train_llm_on_parquet_sharegpt_with_a_prompt_completion_eval(tmp_path):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("datasets")
    rows = [json.loads(line) for line in embedded_lm_data("task_add_train.jsonl").read_text().splitlines()[:24]]
    chats = [
        {"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}]}
        for r in rows
    ]
    pandas.DataFrame(chats).to_parquet(tmp_path / "chats.parquet")
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "mira lives in", "completion": " tolva"}] * 4)
    argv = ["train-llm", str(tmp_path / "chats.parquet"), "--eval", str(tmp_path / "test.jsonl")]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--steps", "2", "--batch-size", "4", "--cpu", "--format", "sharegpt"]
    assert main(argv) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    events = [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text().splitlines()]
    data_event = next(e for e in events if e["kind"] == "data")
    assert "24 rows (sharegpt) -> 24 training sequences" in data_event["message"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and "test/loss" in info["after"]
    assert "format: sharegpt" in (run_dir / "config.yaml").read_text()


def test_data_check_of_preference_pairs_shows_both_sides_and_the_trainers_counts(tmp_path, tokenizer, capsys):
    from studio.llm.preference import tokenize_pairs

    rows = [json.loads(line) for line in embedded_lm_data("preference_add_train.jsonl").read_text().splitlines()[:6]]
    rows[2]["rejected"] = [{"role": "assistant", "content": " ".join(["mira has 2 cakes ."] * 8)}]  # long side
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["data", "check", str(path), "--max-length", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 6 usable rows, format preference (detected from line 1)"
    fitted = tokenize_pairs(load_rows(path).rows, tokenizer, 30)
    assert fitted.truncated == 1
    assert out[2] == (
        f"max_length 30: {fitted.truncated} pair(s) would be truncated, {fitted.dropped} dropped "
        f"(a side with no response token left), {len(fitted.examples)} train"
    )
    chosen, rejected = rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"]
    assert out[3].startswith("first pair, chosen (") and out[5] == f'  loss: yes | "{chosen} </s>"'
    assert out[6].startswith("first pair, rejected (") and out[8] == f'  loss: yes | "{rejected} </s>"'
