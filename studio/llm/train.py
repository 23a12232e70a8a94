"""`train_llm`: any peft_core method on any Hugging Face causal LM, read top to bottom.

    job = LlmJob(data=Path("train.jsonl"), eval_data=[Path("test.jsonl")], base="embedded",
                 adapter=LoraConfig(targets=["all-linear"], r=8, alpha=16), train=LlmTrainConfig(steps=200))
    result = train_llm(job, "runs/my-run", on_event=print)

The algorithm, in five steps:
1. check   - the config, the data (every malformed JSONL line, by number) and the method against the
             model's architecture, built on the meta device: nothing is loaded before they pass;
2. set up  - accelerate, the base model (optionally NF4), LoRAM's prune, the method's prepare step
             (CorDA covariances, SPT sensitivities) on the first training examples, optimizer, schedule;
3. fit     - the causal-LM loss on response tokens, normalised by the global step's token count, so
             one process and N processes with the same global batch follow the same curve (DPO / ORPO:
             the per-pair loss of studio.llm.preference, normalised by the global step's pair count);
4. evaluate- loss / perplexity, multiple-choice and preference accuracy on held-out data, before and after;
5. save    - the adapter (peft_core format; LoRAM: recovered to the full model's shapes), optionally
             a merged model and a PEFT-format export.

Exact resume: which examples step s uses comes from (seed, s) alone, and checkpoints restore the
adapter, optimizer, scheduler and RNG (pipelines.checkpoint), so a resumed run equals an
uninterrupted one. The optimizer, the LR schedule, accelerate, the stop protocol and the event
type are the training kit every trainer shares (pipelines.training).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_core import AdapterHandle, attach, get_method
from peft_core import load as load_adapter
from peft_core.io import read_json
from peft_core.methods import loram
from pipelines import training  # the kit every trainer shares
from pipelines.checkpoint import latest_checkpoint, load_checkpoint
from pipelines.errors import UserError
from pipelines.training import TrainEvent
from studio.llm.config import LlmJob
from studio.llm.data import (
    Example,
    StepSampler,
    TokenizedData,
    collate,
    default_data,
    model_inputs,
    read_data,
    tokenize,
)
from studio.llm.evaluate import EvalSet, evaluate, load_eval_set
from studio.llm.losses import token_loss_sum
from studio.llm.model import check_method_on_model, load_model, load_tokenizer, loram_keep, model_source, save_merged
from studio.llm.preference import (
    PREFERENCE_OBJECTIVES,
    PreferenceData,
    check_objective,
    collate_pairs,
    default_preference_data,
    preference_loss_sum,
    read_preference_data,
)

SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate's distributed types train-llm refuses


@dataclass
class LlmResult:
    adapter_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    losses: list[float]
    trainable_params: int
    wall_s: float
    peak_gib: float | None = None
    merged_dir: Path | None = None
    peft_dir: Path | None = None


def train_llm(
    job: LlmJob,
    run_dir: str | os.PathLike,
    on_event: Callable[[TrainEvent], Any] | None = None,
    accelerator=None,
    adapter_name: str = "default",
    should_stop: Callable[[], bool] | None = None,
    inputs: _Inputs | None = None,
) -> LlmResult:
    """Check, set up, fit, evaluate, save (see the module docstring). Resumes from run_dir's newest
    checkpoint if there is one. Every process of an `accelerate launch` runs this; only the main
    process writes files and emits events.

    `should_stop()` is asked after every step (default: does `run_dir/STOP` exist?), as in the
    diffusion loop: when it answers yes, the step is checkpointed, the STOP file removed and
    `pipelines.training.StopRequested` (a KeyboardInterrupt) raised, so `--resume` continues from there.
    This is how the UI cancels an LLM job. `inputs`: the data as `read_inputs(job)` read it (default:
    read here)."""
    run_dir = Path(run_dir)
    should_stop = should_stop or training.stop_file_exists(run_dir)
    accelerator = accelerator or training.make_accelerator(job.train.mixed_precision, cpu=job.cpu)
    emit = (on_event or _ignore) if accelerator.is_main_process else _ignore
    started = time.perf_counter()

    # 1. Check everything before loading weights: config, method vs architecture, data.
    _check(job, accelerator)
    inputs = inputs or read_inputs(job)
    emit(TrainEvent("data", 0, job.train.steps, message=inputs.summary))

    # 2. Set up: model, LoRAM's prune, the method's prepare step, adapter, optimizer, schedule.
    run, start_step = _set_up(job, run_dir, accelerator, inputs, adapter_name, emit)

    # 3. Fit.
    losses, peak = _fit(run, start_step, should_stop)

    # 4. Evaluate and 5. save (main process).
    adapter_dir = run_dir / "adapter" / adapter_name
    result = LlmResult(adapter_dir, run.before, {}, losses, run.trainable_params, 0.0, peak)
    if accelerator.is_main_process:
        _evaluate_and_save(run, result)
        result.wall_s = time.perf_counter() - started
        emit(
            TrainEvent(
                "done",
                job.train.steps,
                job.train.steps,
                loss=losses[-1] if losses else None,
                path=str(adapter_dir),
                metrics={"trainable_params": run.trainable_params, "wall_s": result.wall_s, "peak_gib": peak},
            )
        )
    accelerator.wait_for_everyone()
    return result


def _ignore(event: TrainEvent) -> None:
    """The event sink of processes other than the main one."""


@dataclass
class _Inputs:
    """The checked, tokenized data of one run."""

    tokenizer: Any
    data: TokenizedData | PreferenceData  # SFT examples, or DPO / ORPO pairs
    eval_sets: list[EvalSet]
    calibration: list[Example]  # CorDA / SPT: what their prepare step looks at
    summary: str = ""  # the training data in one line (the "data" event)


@dataclass
class _Run:
    """What one `train_llm` run holds while it fits (built by `_set_up`)."""

    job: LlmJob
    run_dir: Path
    adapter_name: str
    accelerator: Any
    emit: Callable[[TrainEvent], Any]
    tokenizer: Any
    data: TokenizedData | PreferenceData
    eval_sets: list[EvalSet]
    wrapped: Any  # the model as accelerate prepared it (DDP-wrapped with several processes)
    handle: AdapterHandle
    parameters: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    guard: training.DivergenceGuard  # checks each step's loss and the adapter before every write
    before: dict[str, float] = field(default_factory=dict)
    full_model: Any = None  # LoRAM: the unpruned model (on the CPU while the small one trains)
    index_map: Any = None  # LoRAM: which rows/columns the small model kept

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters)


def _check(job: LlmJob, accelerator) -> None:
    """The config, the process layout, and the method against the model's architecture (nothing loaded)."""
    if accelerator.distributed_type.value in SHARDED:
        raise UserError(
            f"train-llm runs data-parallel (DDP) only, not {accelerator.distributed_type.value}: adapters are "
            "saved and recovered from unsharded tensors (docs/llm.md says which methods could shard and why)"
        )
    job.train.check()
    if job.train.loss_chunk_tokens and accelerator.num_processes > 1:
        raise UserError(
            "loss_chunk_tokens works in one process only for now (the chunked loss bypasses the DDP "
            "wrapper's forward, which would skip the gradient all-reduce): set it to 0 with several processes"
        )
    check_method_on_model(job)


def read_inputs(job: LlmJob) -> _Inputs:
    """Training, evaluation and calibration rows, read and tokenized (the embedded task if no data is
    given); every problem is a UserError. `studio train-llm` calls it before it makes the run folder and
    hands the result to `train_llm(inputs=...)`, so bad data never leaves a run behind."""
    train = job.train
    check_objective(train)
    preference = train.objective in PREFERENCE_OBJECTIVES
    data_path, eval_paths = job.data, job.eval_data
    if data_path is None:  # the embedded task, evaluated on its test set and probe unless --eval names files
        data_path, default_eval = default_preference_data() if preference else default_data()
        eval_paths = eval_paths or default_eval
    tokenizer = load_tokenizer(job)
    if preference:
        data = read_preference_data(data_path, train, tokenizer)
        calibration = [pair.chosen for pair in data.examples]  # CorDA / SPT look at prompt + chosen response
    else:
        rows = read_data(data_path, train.skip_bad_lines, data_format=train.format)
        if rows.format == "preference":
            raise UserError(
                f"{data_path} holds preference rows (prompt / chosen / rejected): train them with --objective dpo "
                "or orpo (to fine-tune on the chosen responses alone, give them as prompt / completion rows)"
            )
        data = tokenize(rows.rows, tokenizer, train.max_length, train.packing, str(data_path), rows.format)
        calibration = data.examples
    eval_sets = [load_eval_set(Path(path), tokenizer, train) for path in eval_paths]  # formats detected per file
    if job.calibration_data is not None:
        calibration = tokenize(
            read_data(job.calibration_data, train.skip_bad_lines, data_format=train.format).rows,
            tokenizer,
            train.max_length,
            source=str(job.calibration_data),
        ).examples
    return _Inputs(tokenizer, data, eval_sets, calibration, data.summary(data_path, train.max_length))


def _set_up(
    job: LlmJob, run_dir: Path, accelerator, inputs: _Inputs, adapter_name: str, emit: Callable[[TrainEvent], Any]
) -> tuple[_Run, int]:
    """The model with its adapter, optimizer and schedule, resumed from run_dir's newest checkpoint if any;
    returns the run and the step to start from. A fresh run is evaluated before training (main process)."""
    train, device = job.train, accelerator.device
    torch.manual_seed(train.seed)
    model, tokenizer = load_model(job, device)
    before = {}
    checkpoint = latest_checkpoint(run_dir)
    if accelerator.is_main_process and checkpoint is None and inputs.eval_sets:
        before = evaluate(model, inputs.eval_sets, tokenizer, train.eval_batch_size, device)
        emit(TrainEvent("eval", 0, train.steps, metrics={"when": "before", **before}))
    full_model, index_map = None, None
    if train.loram_ratio > 0:
        first, last = loram_keep(train, len(loram.find_decoder_layers(model)))
        full_model = model.to("cpu")  # the large model waits on the CPU; only the small one trains
        model, index_map = loram.prune(
            full_model, train.loram_ratio, train.loram_strategy, first, last, seed=train.seed
        )
        model.to(device)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    handle = _attach_adapter(job, model, checkpoint, inputs.calibration, tokenizer, device, adapter_name)
    parameters = handle.trainable_parameters()
    optimizer = training.make_optimizer(parameters, train, device)
    lr_scheduler = training.make_lr_scheduler(optimizer, train)
    handle.track_optimizer(optimizer)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    start_step = 0
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, handle, optimizer, lr_scheduler)["step"]
        before = _read_before(run_dir)
    scale_flag = "--alpha" if hasattr(job.adapter, "alpha") else None
    hint = training.divergence_hint(train.learning_rate, train.max_grad_norm, scale_flag=scale_flag)
    run = _Run(
        job,
        run_dir,
        adapter_name,
        accelerator,
        emit,
        tokenizer,
        inputs.data,
        inputs.eval_sets,
        wrapped,
        handle,
        parameters,
        optimizer,
        lr_scheduler,
        training.DivergenceGuard(train.steps, hint, emit),
        before,
        full_model,
        index_map,
    )
    return run, start_step


def _attach_adapter(
    job: LlmJob, model, checkpoint: Path | None, calibration: list[Example], tokenizer, device, adapter_name: str
) -> AdapterHandle:
    """The trainable adapter: the checkpoint's (it rebuilds itself, prepared data included, without data),
    else a fresh one, after the method's prepare step on the calibration examples where it has one."""
    if checkpoint is not None:
        return load_adapter(model, checkpoint / "adapter" / adapter_name, name=adapter_name, trainable=True)
    prepare = get_method(job.adapter.method).prepare
    if prepare is not None:
        prepared = prepare(model, job.adapter, _calibration_batches(job, model, calibration, tokenizer, device))
        return attach(model, job.adapter, name=adapter_name, prepared=prepared)
    return attach(model, job.adapter, name=adapter_name)


def _calibration_batches(
    job: LlmJob, model, examples: list[Example], tokenizer, device
) -> Iterator[dict[str, torch.Tensor]]:
    """CorDA / SPT data: the first `calibration_examples` examples, in training-size batches."""
    from tqdm import tqdm

    chosen = examples[: job.train.calibration_examples]
    starts = range(0, len(chosen), job.train.batch_size)
    for start in tqdm(starts, desc=f"calibration on {len(chosen)} examples", unit="batch", leave=False):
        batch = collate(chosen[start : start + job.train.batch_size], tokenizer.pad_token_id)
        batch = _packed_inputs(model, {k: v.to(device) for k, v in batch.items()})
        yield {**batch, "use_cache": False} if "position_ids" in batch else batch


def _read_before(run_dir: Path) -> dict[str, float]:
    """The before-training metrics a resumed run's checkpoint carries."""
    checkpoint = latest_checkpoint(run_dir)
    return read_json(checkpoint / "state.json")["extra"].get("before", {}) if checkpoint else {}


def _fit(run: _Run, start_step: int, should_stop: Callable[[], bool]) -> tuple[list[float], float | None]:
    """Steps start_step..steps-1, with events, periodic evaluation, checkpoints and requested stops;
    returns the step losses and the peak GPU memory in GiB (None off CUDA)."""
    train, accelerator, device = run.job.train, run.accelerator, run.device
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = StepSampler(len(run.data.examples), train.batch_size, train.seed, accelerator.num_processes)
    run.wrapped.train()
    losses, fit_started = [], time.perf_counter()
    training.in_step_loop(True)  # a stop signal now finishes the step in progress and checkpoints it
    for step in range(start_step, train.steps):
        step_loss = _step(run, sampler, step)
        losses.append(step_loss)
        done = step + 1
        eta = (time.perf_counter() - fit_started) / (done - start_step) * (train.steps - done)
        lr = run.lr_scheduler.get_last_lr()[0]
        run.emit(TrainEvent("step", done, train.steps, loss=step_loss, lr=lr, eta_s=eta))
        _maybe_evaluate(run, done)
        stop = done < train.steps and training.stop_requested(should_stop, accelerator)
        _maybe_checkpoint(run, done, step_loss, force=stop)
        if stop:
            training.serve_stop(run.run_dir, accelerator, done, train.steps)
    training.in_step_loop(False)  # every step is checkpointed: a signal now stops at once
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    accelerator.wait_for_everyone()
    return losses, peak


def _step(run: _Run, sampler: StepSampler, step: int) -> float:
    """One optimizer step over `gradient_accumulation` micro-batches; returns the global step's loss.

    loss = sum of response-token losses / tokens in the whole global step (all micro-batches, all
    processes), times the process count because DDP averages gradients: any split of the same
    global batch gives the same gradient. DPO / ORPO: the sum of per-pair losses / pairs in the
    global step, the same way."""
    train, accelerator, examples = run.job.train, run.accelerator, run.data.examples
    processes, accumulation = accelerator.num_processes, train.gradient_accumulation
    preference = isinstance(run.data, PreferenceData)
    micro_steps = range(step * accumulation, (step + 1) * accumulation)
    indices = [i for m in micro_steps for i in sampler.indices(m)]
    tokens = len(indices) if preference else sum(examples[i].label_count for i in indices)  # the denominator
    step_loss = torch.zeros((), device=run.device)
    for number, micro in enumerate(micro_steps):
        chunk = [examples[i] for i in sampler.indices(micro, accelerator.process_index)]
        sync = number == accumulation - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(run.wrapped), accelerator.autocast():
            loss_sum = _loss_sum(run, chunk, preference)
            accelerator.backward(loss_sum * (processes / tokens))
        step_loss += loss_sum.detach() / tokens
    grad_norm = accelerator.clip_grad_norm_(run.parameters, train.max_grad_norm) if train.max_grad_norm > 0 else None
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.step()
    # The step's one host sync: the loss summed over processes, and the (already all-reduced) gradient norm,
    # so every process sees the same values and a divergence stops them all at the same step. fp16's
    # gradient scaler skips steps whose gradients overflow: an inf norm there is routine, not divergence.
    loss, norm = training.host_values(accelerator.reduce(step_loss, "sum"), grad_norm)
    run.guard.step(step + 1, loss, norm if accelerator.scaler is None else None)
    return loss


def _loss_sum(run: _Run, chunk: list, preference: bool) -> torch.Tensor:
    """This process's share of a micro-step: the summed response-token losses of its examples, or (DPO /
    ORPO) the summed per-pair losses of its pairs."""
    bare = run.accelerator.unwrap_model(run.wrapped)
    if preference:
        batch = {k: v.to(run.device) for k, v in collate_pairs(chunk, run.tokenizer.pad_token_id).items()}
        return preference_loss_sum(run.wrapped, bare, run.handle, run.adapter_name, batch, run.job.train)
    batch = {k: v.to(run.device) for k, v in collate(chunk, run.tokenizer.pad_token_id).items()}
    batch = _packed_inputs(bare, batch)
    return token_loss_sum(_with_positions(run.wrapped, batch), batch, run.job.train.loss_chunk_tokens)


def _packed_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A packed batch as this model must see it (studio.llm.data.model_inputs: a block-diagonal mask, or
    FlashAttention's padding-free varlen row); any other batch unchanged."""
    config = getattr(model, "config", None)
    return model_inputs(batch, getattr(config, "_attn_implementation", None), getattr(model, "dtype", torch.float32))


class _PositionedModel:
    """The model, called with a packed batch's position_ids (token_loss_sum passes input_ids and the
    attention mask only) and without a KV cache; every other attribute is the model's."""

    def __init__(self, model, position_ids: torch.Tensor) -> None:
        self._model, self._position_ids = model, position_ids

    def __call__(self, **inputs):
        return self._model(**inputs, position_ids=self._position_ids, use_cache=False)

    @property
    def base_model(self):  # the chunked loss calls the bare transformer
        return _PositionedModel(self._model.base_model, self._position_ids)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _with_positions(model, batch: dict[str, Any]):
    """`model`, or the model fed the batch's position_ids where it holds packed blocks."""
    return _PositionedModel(model, batch["position_ids"]) if "position_ids" in batch else model


def _maybe_evaluate(run: _Run, done: int) -> None:
    """Held-out metrics every `eval_every` steps (main process; before and after come anyway)."""
    train = run.job.train
    if not (run.accelerator.is_main_process and train.eval_every and run.eval_sets):
        return
    if done % train.eval_every == 0 and done < train.steps:
        model = run.accelerator.unwrap_model(run.wrapped)
        metrics = evaluate(model, run.eval_sets, run.tokenizer, train.eval_batch_size, run.device)
        run.emit(TrainEvent("eval", done, train.steps, metrics=metrics))


def _maybe_checkpoint(run: _Run, done: int, step_loss: float, force: bool) -> None:
    """A checkpoint every `checkpoint_every` steps, at the end, and when `force`d (a requested stop)."""
    train = run.job.train
    if not training.checkpoint_due(done, train.checkpoint_every, train.steps, force):
        return
    run.guard.check_finite(run.handle, done, [run.adapter_name], run.optimizer)  # every process: all stop together
    if run.accelerator.is_main_process:
        training.save_step_checkpoint(run, done, train.steps, extra={"loss": step_loss, "before": run.before})


def _evaluate_and_save(run: _Run, result: LlmResult) -> None:
    """Save the adapter (LoRAM: recovered to the full shapes, and evaluated on the full model: train
    small, infer large), evaluate it, and write the optional PEFT export and merged model."""
    job, name, adapter_dir = run.job, run.adapter_name, result.adapter_dir
    model, handle = run.accelerator.unwrap_model(run.wrapped), run.handle
    run.guard.check_finite(handle, job.train.steps, [name])  # never write a non-finite adapter
    if run.index_map is not None:
        loram.recover(handle, run.index_map, adapter_dir, name=name)
        del model, handle
        run.wrapped = run.handle = None
        model = run.full_model.to(run.device)
        handle = load_adapter(model, adapter_dir, name=name)
    else:
        handle.save(adapter_dir, name=name)
    if run.eval_sets:
        result.after = evaluate(model, run.eval_sets, run.tokenizer, job.train.eval_batch_size, run.device)
        run.emit(TrainEvent("eval", job.train.steps, job.train.steps, metrics={"when": "after", **result.after}))
    if job.export_peft:
        result.peft_dir = handle.export(
            run.run_dir / "peft",
            format="peft",
            name=name,
            task_type="CAUSAL_LM",
            base_model_name_or_path=model_source(job.base),
        )
    if job.save_merged:
        result.merged_dir = save_merged(job, adapter_dir, run.run_dir / "merged", run.tokenizer)
