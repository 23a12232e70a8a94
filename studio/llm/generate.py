"""Talk to a trained run: its base with the final adapter, and the model's continuation of a prompt."""

from __future__ import annotations

import os

import torch

from peft_core import load as load_adapter
from pipelines.errors import UserError
from studio.llm.config import LlmJob, job_from_record
from studio.llm.data import render_chat, token_ids
from studio.llm.model import load_model
from studio.preflight import run_record


def load_for_generation(
    run_dir: str | os.PathLike | None = None, base: str | None = None, device: str | torch.device | None = None
):
    """(model, tokenizer) ready for `generate_text`: a finished `studio train-llm` run's base with its
    final adapter loaded (LoRAM runs: the recovered, full-size adapter), or a base alone when
    `run_dir` is None. `base` overrides the run's own base (default "embedded")."""
    from studio.runs import Run

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if run_dir is None:
        job = LlmJob(adapter=None, base=base or "embedded")  # no adapter: load_model reads only base and train
        model, tokenizer = load_model(job, device)
        model.eval()
        return model, tokenizer
    run = Run.open(run_dir)
    run_record(run, "train-llm")  # a damaged config.yaml or a run of another kind: one line
    adapters = sorted(p for p in (run.directory / "adapter").glob("*") if (p / "adapter_config.json").is_file())
    if not adapters:
        raise UserError(
            f"{run.directory} has no final adapter (status: {run.info.get('status')}); "
            "resume it to the end or pick a finished run"
        )
    job = run_record(run, "train-llm", job_from_record)
    if base is not None:
        job.base = base
    model, tokenizer = load_model(job, device)
    load_adapter(model, adapters[0])
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
) -> str:
    """The model's continuation of `prompt` (new text only, special tokens dropped).

    chat=True renders the prompt as one user turn with the tokenizer's chat template (the
    fallback template if it has none) plus the generation prompt, exactly as the trainer renders
    an instruction row, so a model trained on instruction/chat rows sees its training format;
    chat=False continues the raw text. temperature 0 is greedy (deterministic); above 0 samples,
    reproducibly from `seed`."""
    if not prompt or not prompt.strip():
        raise UserError("write a prompt")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError(
            f"max_new_tokens must be >= 1, temperature >= 0 and top_p in (0, 1]; "
            f"got {max_new_tokens}, {temperature}, {top_p}"
        )
    text = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
    device = next(model.parameters()).device
    input_ids = torch.tensor([token_ids(tokenizer, text)], device=device)  # (1, T)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] >= limit:
        raise UserError(f"the prompt is {input_ids.shape[1]} tokens; this model reads at most {limit}")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - input_ids.shape[1])
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            top_k=None,
            **sampling,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
