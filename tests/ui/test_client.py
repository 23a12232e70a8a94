"""`gradio_client` against a launched `studio ui`: two users training at the same time get separate,
correct runs; the LLM tab trains a few steps, shows its metrics, and its chat box answers."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ui_server import PASSWORD, USER, studio_ui

pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'peft-studio[ui]'")
gradio_client = pytest.importorskip("gradio_client", reason="this test needs gradio_client (it comes with gradio)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with studio_ui(tmp_path_factory.mktemp("ui-client"), "--max-jobs", "2") as running:
        yield running


def client(server):
    return gradio_client.Client(server.url, auth=(USER, PASSWORD), verbose=False)


def style_form(rank: int, seed: int) -> dict:
    """The training form's fields, named as the API names them (the page's inputs, then the option
    fields of `studio train-style`; see ui/forms.py)."""
    return {
        "kind": "style",
        "source": "demo set",
        "demo_set": "style-neon",
        "files": None,
        "run_name": "twin",
        "template": "",
        "trigger": "",
        "method": "lora",
        "rank": rank,
        "alpha": float(rank),
        "set": "targets=[to_q, to_v]",
        "steps": 2,
        "batch_size": 1,
        "learning_rate": 3e-3,
        "lr_schedule": "constant",
        "seed": seed,
        "checkpoint_every": 100,
        "sample_every": 0,
        "sample_prompts": "a star in neon style",
        "sample_steps": 1,
    }


def poll_until_done(clients: list, endpoint: str, timeout: float = 240) -> list[tuple]:
    """Each client's last poll once every client's job has finished or failed."""
    deadline, last = time.monotonic() + timeout, [None] * len(clients)
    while True:
        last = [c.predict(api_name=endpoint) for c in clients]
        if all(re.search(r"\*\*(finished|failed|interrupted|cancelled)\*\*", out[0]) for out in last):
            return last
        assert time.monotonic() < deadline, [out[0] for out in last]
        time.sleep(1.0)


def test_two_clients_train_at_once_into_separate_correct_runs(server):
    from safetensors.torch import load_file

    alice, bob = client(server), client(server)
    ranks, seeds = (2, 3), (0, 1)
    with ThreadPoolExecutor(2) as pool:  # both press "Start" at the same moment, asking for the same run name
        starts = list(
            pool.map(
                lambda c, r, s: c.predict(**style_form(r, s), api_name="/start_training"), (alice, bob), ranks, seeds
            )
        )
    names = [re.search(r"queued \*\*(.+?)\*\*", status).group(1) for status, *_ in starts]
    assert sorted(names) == ["twin", "twin-2"], starts  # one folder each, nobody refused or overwritten
    polls = poll_until_done([alice, bob], "/poll_training")
    ends = []
    for name, rank, seed, (status, _, image, log) in zip(names, ranks, seeds, polls, strict=True):
        assert "**finished** · step 2 / 2" in status, (status, log)
        run_dir = server.workspace / "runs" / name
        assert f"runs/{name}/" in log  # each session follows its own job
        config = (run_dir / "config.yaml").read_text()
        assert f"r: {rank}" in config and f"seed: {seed}" in config  # each run is its own user's request
        adapter = load_file(run_dir / "adapter" / "style" / "adapter_model.safetensors")
        ranks_seen = {tuple(t.shape) for k, t in adapter.items() if "lora_A" in k or "lora_a" in k.lower()}
        assert ranks_seen and all(rank in shape for shape in ranks_seen), ranks_seen
        sample = run_dir / "samples" / "final.png"
        assert sample.is_file() and Path(image).read_bytes() == sample.read_bytes()  # the served image is this run's
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "finished" and info["step"] == 2
        ends.append(info["updated"])
    # --max-jobs 2: both worker processes were started before either run ended (each job log's first
    # line says when its process started; run.json's times would race on a loaded machine, where
    # one 2-step run can finish before the other process is done importing)
    launched = [
        float(re.search(r"job started .*\(unix ([0-9.]+)\)", log.read_text()).group(1))
        for log in sorted((server.workspace / "jobs").glob("*.log"))
    ]
    assert len(launched) == 2 and max(launched) < min(ends), (launched, ends)


def test_the_llm_tab_trains_and_its_chat_answers(server):
    user = client(server)
    form = {
        "source": "embedded task",
        "train_file": None,
        "eval_file": None,
        "run_name": "client-llm",
        "method": "lora",
        "rank": 4,
        "alpha": 8.0,
        "loram_ratio": 0,
        "set": "",
        "export_peft": False,
        "steps": 3,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "max_length": 64,
        "seed": 0,
        "checkpoint_every": 100,
    }
    status, command, yaml_text = user.predict(**form, api_name="/start_llm")
    assert "queued **client-llm**" in status and command.startswith("studio train-llm --runs-dir ")
    assert "method: lora" in yaml_text and "steps: 3" in yaml_text
    ((status, plot, metrics, log, _),) = poll_until_done([user], "/poll_llm")
    assert "**finished** · step 3 / 3" in status, (status, log)
    assert "| task_add_test/loss |" in metrics and "before" in metrics and "after" in metrics
    assert len(plot["data"]) == 3  # the loss curve: one point a step
    run_dir = server.workspace / "runs" / "client-llm"
    assert (run_dir / "adapter" / "default" / "adapter_model.safetensors").is_file()

    reply, chat_command = user.predict(
        run="client-llm",
        prompt="mira lives in",
        raw=True,  # no chat template: continue the raw text
        max_new_tokens=6,
        temperature=0.0,
        api_name="/chat",
    )
    assert isinstance(reply, str) and reply.strip() and not reply.startswith("(an empty reply")
    assert chat_command.startswith(f"studio chat {run_dir} --prompt 'mira lives in'")

    table, _ = user.predict(api_name="/refresh_runs")  # the run is in the Runs tab like a CLI run
    rows = {row[0]: row for row in table["data"]}
    assert rows["client-llm"][1:4] == ["train-llm", "finished", "3/3"]
