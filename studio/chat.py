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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        nargs="?",
        default=None,
        help="a finished `studio train-llm` run folder (default: no adapter, the base alone)",
    )
    parser.add_argument("--prompt", action="append", required=True, help="what to say (repeat for several prompts)")
    parser.add_argument("--base", default=None, help="the base LM (default: the run's base, or 'embedded')")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest reply in tokens (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the replies as JSON")


def run(args: argparse.Namespace) -> int:
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
