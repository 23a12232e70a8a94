"""`studio chat`: talk to a finished `studio train-llm` run (its base + its adapter), or to a base alone.

    studio chat runs/llm-lora-task_add_train \
        --prompt "bexa has 8 cheese and buys 2 more . how many cheese does bexa have ?"
    studio chat --prompt "mira lives in" --raw                 # the embedded tiny LM alone, plain continuation
    studio chat runs/my-run --prompt "..." --temperature 0.8 --out replies.json

By default the prompt is one user turn rendered with the model's chat template, as the trainer
renders instruction rows; --raw continues the text as written. The UI's chat box runs this command.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipelines.errors import UserError
from pipelines.options import option
from studio.options import Section
from studio.preflight import output_file


@dataclass
class ChatOptions:
    run: str | None = option(
        None, help="a finished `studio train-llm` run folder (default: no adapter, the base alone)", positional=True
    )
    prompt: list[str] = option([], help="what to say (repeat for several prompts)", repeat=True)
    base: str | None = option(None, help="the base LM (default: the run's base, or 'embedded')")
    raw: bool = option(False, help="continue the prompt as plain text (no chat template)")
    max_new_tokens: int = option(32, help="longest reply in tokens", min=1)
    temperature: float = option(0.0, help="0: greedy; above 0: sampling", min=0)
    top_p: float = option(1.0, help="nucleus sampling mass when sampling", above=0, max=1)
    seed: int = option(0, help="seed of the sampling", min=0, max=2**32 - 1)
    cpu: bool = option(False, help="run on the CPU even if a GPU is present")
    out: str | None = option(None, help="also write the replies as JSON", metavar="FILE.json")


def sections() -> list[Section]:
    return [Section(None, ChatOptions)]


def run(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise UserError("give at least one --prompt (repeat it for several)")
    if any(not prompt.strip() for prompt in args.prompt):
        raise UserError("a --prompt is empty; write what to say")
    if args.out:
        output_file(args.out, "--out", ".json")  # before the model loads
    from peft_core.io import write_json
    from studio.llm import generate_text, load_for_generation

    model, tokenizer = load_for_generation(args.run, base=args.base, device="cpu" if args.cpu else None)
    replies = []
    for prompt in args.prompt:
        reply = generate_text(
            model,
            tokenizer,
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            chat=not args.raw,
        )
        replies.append({"prompt": prompt, "reply": reply})
        print(f"> {prompt}\n{reply}", flush=True)
    if args.out:
        write_json(args.out, {"run": args.run, "base": args.base, "chat": not args.raw, "replies": replies})
    return 0
