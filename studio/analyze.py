"""`studio analyze`: the LoRA computational-limits report (which attention heads are in the low-rank regime).

    studio analyze --model embedded-lm --adapter runs/llm-add            # tiny Llama, packed held-out text
    studio analyze --model embedded-sd --adapter runs/style-neon --out analysis/neon
    studio analyze --model ./my-sd15 --kind sd --batches 4 --steps 10

Hooks every attention module (LLM self-attention; UNet self- and cross-attention), runs a few real
batches (LLM: packed blocks of text; SD: a few denoising calls on the shipped sets' prompts), prints
the per-head table and writes report.json + heatmap.png. See docs/analysis.md for how to read it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from pipelines.options import option
from studio.options import Section
from studio.preflight import device_problem, writable_folder

EMBEDDED = {"embedded-lm": "lm", "embedded-sd": "sd"}


@dataclass
class AnalyzeOptions:
    model: str = option("embedded-lm", help="embedded-lm, embedded-sd, a hub id or a local folder/file")
    kind: str = option(
        "auto",
        help="lm (causal LM) or sd (Stable Diffusion); auto reads the folder (needed for hub ids)",
        choices=("auto", "lm", "sd"),
    )
    adapter: str | None = option(
        None,
        help="adapter folder or run folder to analyse on top of the base (SD: on the UNet)",
        metavar="RUN_OR_ADAPTER_DIR",
    )
    batches: int = option(2, help="batches to run", min=1)
    batch_size: int | None = option(None, help="sequences (LM, default 4) or prompts (SD, default 2) per batch", min=1)
    seq_len: int = option(128, help="LM: tokens per packed sequence", min=2)
    data: str | None = option(
        None,
        help="LM: a .txt (one document per line) or .jsonl (text / instruction+response) file; "
        "default: the embedded held-out text",
    )
    steps: int = option(4, help="SD: denoising steps per batch", min=1, max=1000)
    guidance: float = option(5.0, help="SD: classifier-free guidance scale", min=0)
    seed: int = option(0, help="SD: noise seed", min=0, max=2**32 - 1)
    out: str = option("analysis", help="output folder for report.json and heatmap.png")
    device: str | None = option(None, help="cpu or cuda (default: cuda if available)", check=device_problem)


def sections() -> list[Section]:
    return [Section(None, AnalyzeOptions)]


def run(args: argparse.Namespace) -> int:
    from peft_core.analysis import attention_regime_report

    if args.batches < 1:
        raise UserError(f"--batches must be at least 1, got {args.batches}")
    kind = _resolve_kind(args.model, args.kind)
    out = writable_folder(args.out, "--out")  # before any model loads
    _adapter_folder(args.adapter)
    if args.data and kind == "sd":
        raise UserError("--data is text for a language model; Stable Diffusion runs the shipped sets' prompts")
    if args.data:
        _documents(Path(args.data))
    metadata: dict[str, Any] = {"model": args.model, "kind": kind, "adapter": args.adapter}
    if kind == "lm":
        model, batches, step, config = _lm_setup(args, metadata)
    else:
        model, batches, step, config = _sd_setup(args, metadata)
    report = attention_regime_report(model, batches, step=step, config=config, metadata=metadata)
    print(report.format_table())
    report.save_json(out / "report.json")
    report.save_heatmap(out / "heatmap.png")
    print(f"wrote {out / 'report.json'} and {out / 'heatmap.png'}")
    return 0


def _resolve_kind(model: str, kind: str) -> str:
    if model in EMBEDDED:
        if kind != "auto" and kind != EMBEDDED[model]:
            raise UserError(f"--model {model} is a {EMBEDDED[model]} model, but --kind says {kind}")
        return EMBEDDED[model]
    if kind != "auto":
        return kind
    path = Path(model).expanduser()
    if (path / "model_index.json").is_file() or path.suffix in (".safetensors", ".ckpt"):
        return "sd"
    if (path / "config.json").is_file():
        return "lm"
    if path.exists():
        raise UserError(
            f"{model} is neither a diffusers folder (model_index.json) nor a transformers folder (config.json)"
        )
    raise UserError(
        f"cannot tell whether {model!r} is a language model or Stable Diffusion; pass --kind lm or --kind sd"
    )


def _adapter_folder(argument: str | None) -> Path | None:
    if argument is None:
        return None
    from studio.generate import parse_adapter

    folder, _ = parse_adapter(argument)
    return folder


def _device(argument: str | None) -> str:
    import torch

    return argument or ("cuda" if torch.cuda.is_available() else "cpu")


# -- language models -----------------------------------------------------------------------------
def _lm_setup(args: argparse.Namespace, metadata: dict[str, Any]):
    from peft_core import load
    from pipelines.base import embedded_lm_data, load_embedded_lm

    spec = "embedded" if args.model == "embedded-lm" else args.model
    model, tokenizer = load_embedded_lm(spec)
    device = _device(args.device)
    model.to(device).eval()
    folder = _adapter_folder(args.adapter)
    if folder is not None:
        load(model, folder)
    batch_size = args.batch_size or 4
    limit = getattr(model.config, "max_position_embeddings", None)
    seq_len = min(args.seq_len, limit) if limit else args.seq_len
    documents = _documents(Path(args.data) if args.data else embedded_lm_data("heldout.txt"))
    blocks = _pack(documents, tokenizer, seq_len, args.batches * batch_size)
    batches = [{"input_ids": blocks[i : i + batch_size].to(device)} for i in range(0, len(blocks), batch_size)]
    metadata.update(
        {
            "batches": len(batches),
            "batch_size": batch_size,
            "seq_len": seq_len,
            "data": args.data or "embedded heldout.txt",
        }
    )
    return model, batches, None, model.config


def _documents(path: Path) -> list[str]:
    """The documents of --data: a .txt file's non-empty lines, or a .jsonl file's texts (UTF-8 both)."""
    if not path.is_file():
        raise UserError(f"--data {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise UserError(
            f"--data {path} line {line} is not UTF-8 (byte {error.object[error.start]:#04x}); re-save the file as UTF-8"
        ) from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        return [line for _, line in lines]
    documents = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} line {number}: not valid JSON ({error.msg}); write one JSON object per line"
            ) from None
        text = row.get("text") if isinstance(row, dict) else None
        if isinstance(row, dict) and not text:
            text = " ".join(str(row[key]) for key in ("instruction", "response") if key in row)
        if not isinstance(text, str) or not text:
            raise UserError(f"{path} line {number}: expected a 'text' or 'instruction'/'response' field")
        documents.append(text)
    if not documents:
        raise UserError(f"--data {path} holds no text")
    return documents


def _pack(documents: list[str], tokenizer, seq_len: int, count: int):
    """`count` blocks of `seq_len` tokens from the documents laid end to end (no padding, so every
    key a query sees is real text)."""
    import torch

    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= seq_len * count:
            break
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise UserError(f"the data holds {len(ids)} tokens, fewer than one sequence of --seq-len {seq_len}")
    return torch.tensor(ids[: min(blocks, count) * seq_len]).view(-1, seq_len)


# -- Stable Diffusion ----------------------------------------------------------------------------
def _sd_setup(args: argparse.Namespace, metadata: dict[str, Any]):
    import torch

    from peft_core import load
    from pipelines import load_base
    from pipelines.families import family_of

    pipe = load_base("embedded" if args.model == "embedded-sd" else args.model, device=_device(args.device))
    pipe.set_progress_bar_config(disable=True)
    denoiser = family_of(pipe).denoiser(pipe)  # the UNet, or SD3's / Flux's transformer
    denoiser.eval()
    folder = _adapter_folder(args.adapter)
    if folder is not None:
        load(denoiser, folder)
    batch_size = args.batch_size or 2
    prompts = _set_prompts(args.batches * batch_size)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]

    def step(unet, batch: list[str]) -> None:
        generator = torch.Generator().manual_seed(args.seed)
        pipe(
            batch,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            output_type="latent",
            generator=generator,
        )

    metadata.update(
        {
            "batches": len(batches),
            "batch_size": batch_size,
            "steps": args.steps,
            "guidance": args.guidance,
            "prompts": prompts,
        }
    )
    return denoiser, batches, step, None


def _set_prompts(count: int) -> list[str]:
    """Captions of the shipped image sets (assets/sets/*/metadata.jsonl), taken round-robin across sets."""
    from pipelines.base import ASSETS

    per_set = []
    for metadata in sorted((ASSETS / "sets").glob("*/metadata.jsonl")):
        per_set.append([json.loads(line)["text"] for line in metadata.read_text().splitlines() if line.strip()])
    if not per_set:
        raise UserError(f"no image sets with metadata.jsonl under {ASSETS / 'sets'}")
    prompts = []
    index = 0
    while len(prompts) < count:
        captions = per_set[index % len(per_set)]
        prompts.append(captions[(index // len(per_set)) % len(captions)])
        index += 1
    return prompts
