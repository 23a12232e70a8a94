"""No silent divergence (docs/reliability.md, "Divergence"): a run whose loss, gradient norm or adapter
goes NaN/inf ends `failed` with one actionable line (CLI: `error: ...`, exit 2), and nothing non-finite
is ever written: no checkpoint, no adapter, no sample; the last good checkpoint stays. run.json and
events.jsonl stay strict JSON. Generation refuses NaN adapters and NaN weights."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from peft_core import LoraConfig, attach, get_handle
from peft_core.errors import AdapterError
from peft_core.io import read_safetensors, write_json
from pipelines.base import embedded_lm_data
from pipelines.errors import UserError
from pipelines.training import DivergenceGuard, NonFiniteLoss, TrainEvent, check_finite, host_values
from studio.cli import main
from studio.runs import Run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from micro_sd import ColourDataset, micro_pipeline  # noqa: E402

IMAGE_RUN = ["--batch-size", "1", "--sample-steps", "1", "--checkpoint-every", "1"]


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python's json writes and reads by default)."""

    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def only_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if (p / "run.json").is_file()]
    return run


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_failed_cleanly(run: Path, stderr: str, where: str) -> dict:
    """One error line naming the step and the fix; run.json strict and failed with it; every tensor on
    disk finite; every event line strict JSON."""
    (line,) = error_lines(stderr)
    assert f"training diverged {where}" in line and "lower the learning rate" in line, line
    assert "Traceback" not in stderr
    info = strict_json((run / "run.json").read_text())
    assert info["status"] == "failed" and line.removeprefix("error: ") in info["error"]
    for path in run.rglob("*.safetensors"):
        for key, tensor in read_safetensors(path).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{path}: {key} is not finite"
    events = run / "logs" / "events.jsonl"
    for event in events.read_text().splitlines() if events.is_file() else []:
        strict_json(event)
    return info


# -- the three trainers, through the CLI ------------------------------------------------------------
def test_train_style_with_a_huge_learning_rate_fails_and_writes_nothing_non_finite(tmp_path, capsys):
    code = main(["train-style", "--runs-dir", str(tmp_path), "--steps", "3", "--learning-rate", "1e6", *IMAGE_RUN])
    assert code == 2
    run = only_run(tmp_path)
    assert_failed_cleanly(run, capsys.readouterr().err, "at step 2 of 3")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]  # the last good one is kept
    assert not (run / "adapter").exists() and not (run / "samples").exists()


def test_break_for_make_with_a_huge_learning_rate_fails_and_writes_nothing_non_finite(tmp_path, capsys):
    argv = ["break-for-make", "--runs-dir", str(tmp_path), "--break-steps", "2", "--make-steps", "1"]
    code = main([*argv, "--batch-size", "1", "--rank", "4", "--main-lr", "1e6"])
    assert code == 2
    run = only_run(tmp_path)
    stderr = capsys.readouterr().err
    assert_failed_cleanly(run, stderr, "in break-content at step 1 of 2")
    assert "--main-lr, now 1e+06" in stderr
    assert not (run / "stages" / "content").exists() and not (run / "b4m").exists()


def test_a_diverging_make_stage_keeps_the_break_stages_and_writes_no_joint_adapter(tmp_path, capsys):
    argv = ["break-for-make", "--runs-dir", str(tmp_path), "--break-steps", "1", "--make-steps", "3"]
    assert main([*argv, "--batch-size", "1", "--rank", "4", "--make-lr", "1e6"]) == 2
    run = only_run(tmp_path)
    stderr = capsys.readouterr().err
    assert_failed_cleanly(run, stderr, "in make at step")
    assert "--make-lr, now 1e+06" in stderr
    assert (run / "stages" / "content").is_dir() and (run / "stages" / "style").is_dir()  # finite, kept
    assert not (run / "b4m").exists() and not (run / "samples").exists()


def test_train_llm_with_a_huge_learning_rate_fails_and_writes_nothing_non_finite(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(embedded_lm_data("task_add_train.jsonl").read_text().splitlines()[:16]) + "\n")
    argv = ["train-llm", str(data), "--runs-dir", str(tmp_path / "runs"), "--steps", "3", "--batch-size", "2"]
    # 1e20: Adam moves each weight by about lr, so the next matmul overflows float32 on any build (with 1e6
    # torch 2.11 on an H100 host kept the loss finite).
    code = main([*argv, "--warmup-steps", "0", "--learning-rate", "1e20", "--checkpoint-every", "1", "--cpu"])
    assert code == 2
    run = only_run(tmp_path / "runs")
    assert_failed_cleanly(run, capsys.readouterr().err, "at step")
    assert not (run / "adapter").exists()


# -- the diffusion loop's eager and CUDA-graph paths, through the Python API ------------------------
def poison_after(step: int, handle_of):
    """An event handler that, after step `step`, fills one adapter tensor with NaN in place (the tensor a
    recorded CUDA graph reads), as a diverging update would."""

    def on_event(event: TrainEvent) -> None:
        if event.kind == "step" and event.step == step:
            with torch.no_grad():
                handle_of().trainable_parameters()[0].fill_(float("nan"))

    return on_event


class StandInGraphs:
    """On a CPU, the graphed step's plumbing with a stand-in for CudaGraphFactory: `capture` hands out a
    loss buffer and each replay runs the step again and writes its loss there (as tests/pipelines/
    test_cuda_graphs.py does)."""

    @contextlib.contextmanager
    def warmup(self):
        yield

    replays = 0

    def capture(self, fn):
        loss = torch.zeros(())

        def replay():
            StandInGraphs.replays += 1
            loss.copy_(fn())

        return loss, replay


@pytest.mark.parametrize(
    "cuda_graph",
    [
        "off",
        "stand-in",
        pytest.param("on", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")),
    ],
)
def test_the_loop_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(
    tmp_path, cuda_graph, monkeypatch
):
    import pipelines.cuda_graphs
    import pipelines.train
    from pipelines.train import TrainConfig, train_adapter

    if cuda_graph == "stand-in":  # the graphed path on a CPU
        monkeypatch.setattr(pipelines.cuda_graphs, "CudaGraphFactory", StandInGraphs)
        monkeypatch.setattr(pipelines.train, "_use_cuda_graph", lambda *_: True)
    pipe = micro_pipeline(tmp_path / "tok")
    if cuda_graph == "on":
        pipe.to("cuda")
    config = TrainConfig(steps=8, batch_size=2, checkpoint_every=2, cuda_graph="on" if cuda_graph == "on" else "auto")
    on_event = poison_after(5, lambda: get_handle(pipe.unet))  # graphed: step 6 is a replay (2 warm-ups, 1 capture)
    with pytest.raises(NonFiniteLoss, match="training diverged at step 6 of 8: loss nan"):
        train_adapter(
            pipe,
            ColourDataset(6),
            LoraConfig(targets=["to_q", "to_v"], r=2),
            config,
            tmp_path / "run",
            on_event=on_event,
        )
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "run" / "adapter").exists()
    if cuda_graph == "stand-in":
        assert StandInGraphs.replays == 4  # steps 3-6 were replays: the graphed path caught it


def test_a_non_finite_adapter_is_never_checkpointed(tmp_path):
    """Finite loss, finite norm, NaN weights (poisoned after the step): the checkpoint check stops it."""
    from pipelines.train import TrainConfig, train_adapter

    pipe = micro_pipeline(tmp_path / "tok")
    config = TrainConfig(steps=4, batch_size=2, checkpoint_every=2, cuda_graph="off")
    with pytest.raises(NonFiniteLoss, match=r"training diverged after step 2 of 4: non-finite values .* in default: "):
        train_adapter(
            pipe,
            ColourDataset(6),
            LoraConfig(targets=["to_q"], r=2),
            config,
            tmp_path / "run",
            on_event=poison_after(2, lambda: get_handle(pipe.unet)),
        )
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# -- the kit's pieces --------------------------------------------------------------------------------
def test_guard_names_the_step_and_warns_once_when_the_loss_rises():
    events = []
    guard = DivergenceGuard(20, "lower the learning rate", events.append, window=3)
    for step, loss in enumerate([1.0, 1.1, 0.9, 1.0, 2.0, 30.0, 40.0, 50.0, 60.0, 70.0], start=1):
        guard.step(step, loss, grad_norm=0.5)
    (warning,) = events
    assert warning.kind == "message" and "the loss is rising at step 6 of 20: 11 on average" in warning.message
    with pytest.raises(NonFiniteLoss, match=r"at step 11 of 20: loss 1, gradient norm inf; .* lower the learning"):
        guard.step(11, 1.0, grad_norm=math.inf)
    with pytest.raises(NonFiniteLoss, match="at step 12 of 20: loss nan;"):
        guard.step(12, math.nan)
    assert issubclass(NonFiniteLoss, UserError)


def test_check_finite_and_host_values():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    handle = attach(model, LoraConfig(targets=["0"], r=2), name="a")
    check_finite(handle, "after step 1")  # finite: nothing happens
    with torch.no_grad():
        handle.trainable_parameters()[0][0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"after step 1: non-finite values \(NaN or inf\) in a: 0\.lora_A"):
        check_finite(handle, "after step 1")
    assert host_values(torch.tensor(2.5), None, 3) == [2.5, None, 3.0]


def test_run_json_and_events_stay_strict_json_and_write_json_refuses_nan(tmp_path):
    run = Run.create(tmp_path, "r", kind="train-style", config={})
    run.update(loss=float("nan"), eta_s=float("inf"), metrics={"x": [1.0, float("-inf")]})
    run.log_event(TrainEvent("step", 1, 2, loss=float("nan"), lr=1e-3))
    info = strict_json((run.directory / "run.json").read_text())
    assert info["loss"] is None and info["eta_s"] is None and info["metrics"] == {"x": [1.0, None]}
    (line,) = (run.directory / "logs" / "events.jsonl").read_text().splitlines()
    assert strict_json(line)["loss"] is None
    with pytest.raises(AdapterError, match="refusing to write .*bad.json"):
        write_json(tmp_path / "bad.json", {"loss": float("nan")})
    assert not (tmp_path / "bad.json").exists()


# -- generation --------------------------------------------------------------------------------------
def embedded_adapter(tmp_path: Path, poison: bool) -> Path:
    from pipelines import load_base

    unet = load_base("embedded", device="cpu").unet
    handle = attach(unet, LoraConfig(targets=["to_q", "to_v"], r=2), name="style")
    if poison:
        with torch.no_grad():
            handle.trainable_parameters()[0].fill_(float("nan"))
    return handle.save(tmp_path / ("nan-adapter" if poison else "adapter"), name="style")


def test_generate_refuses_a_nan_adapter_and_a_nan_weight(tmp_path, capsys):
    out = tmp_path / "out.png"
    nan_adapter = embedded_adapter(tmp_path, poison=True)
    argv = ["generate", "--prompt", "a star", "--steps", "1", "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--adapter", str(nan_adapter)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"adapter '{nan_adapter}' holds non-finite weights" in line

    good = embedded_adapter(tmp_path, poison=False)
    for weight in ("nan", "inf"):
        assert main([*argv, "--adapter", f"{good}:{weight}"]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert line == f"error: adapter '{good}' has weight '{weight}'; an adapter weight must be a finite number"
    assert not out.exists()


def test_pipelines_generate_refuses_non_finite_adapters_and_weights(tmp_path):
    from pipelines.train import generate

    pipe = micro_pipeline(tmp_path / "tok")
    handle = attach(pipe.unet, LoraConfig(targets=["to_q"], r=2), name="a")
    handle.set_weight("a", float("nan"))
    with pytest.raises(UserError, match="adapter 'a' has weight nan"):
        generate(pipe, ["red"], steps=1)
    handle.set_weight("a", 1.0)
    with torch.no_grad():
        handle.trainable_parameters()[0].fill_(float("inf"))
    with pytest.raises(UserError, match="adapter 'a' holds non-finite weights"):
        generate(pipe, ["red"], steps=1)
    handle.disable("a")  # a disabled adapter does not take part
    generate(pipe, ["red"], steps=1)
