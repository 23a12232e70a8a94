"""Every peft_core method fine-tuned on the embedded LM's held-out task, same step budget.

    python bench/llm_methods.py                          # all methods, ~5 minutes on 2 CPU cores
    python bench/llm_methods.py --methods lora,paca --steps 50 --out /tmp/llm_methods.json

The task is `assets/tiny-lm/data/task_add_{train,test}.jsonl` (word-problem additions whose words and
sums never occur in pretraining; 19-way multiple choice on the test rows), trained through
`studio.llm.train_llm` (the code `studio train-llm` runs) with one schedule for every method:
AdamW, lr 3e-3, cosine after 10 warm-up steps, batch 16, seed 0, fp32.

Reported per method: `accuracy` (task test set, 400 rows), `knowledge` (the 96-item knowledge probe of
facts from pretraining: what fine-tuning should not forget; the base model scores 1.0),
`trainable_params`, `wall_s` (setup + prepare + training + evaluation, in-process) and `peak_gib`
(GPU: peak allocated; CPU: the method's process peak resident memory, which includes Python, torch
and the data, so it mostly shows the floor). Each method runs in its own process.

Parameter matching: PaCA r=16 and SPT's budget equal LoRA r=8's trainable count (PaCA's paper matches
ranks that way); CorDA uses LoRA's rank r=8; LoRAM trains LoRA r=8 on the model pruned at 0.5 and is
evaluated after recovery on the full model; Compacter uses the paper's defaults (n=4, reduction 32,
after o_proj and down_proj), so it trains far fewer parameters. CorDA-IPM calibrates on the first 64
training rows; CorDA-KPM on the knowledge it should preserve (the probe's facts as text), as the paper
calibrates KPM on QA data of the knowledge domain.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO_ROOT, format_table, log, repo_on_path, write_json

repo_on_path()

LORA_PARAMS = 90_112  # LoRA r=8 on every linear of the tiny Llama (checked against the run)
METHODS = {
    "lora": {"adapter": {"method": "lora", "r": 8, "alpha": 16.0}},
    "paca": {"adapter": {"method": "paca", "r": 16, "alpha": 32.0}},
    "loram": {"adapter": {"method": "lora", "r": 8, "alpha": 16.0}, "train": {"loram_ratio": 0.5}},
    "corda": {"adapter": {"method": "corda", "r": 8, "alpha": 16.0, "mode": "ipm"}},
    "corda_kpm": {"adapter": {"method": "corda", "r": 8, "alpha": 16.0, "mode": "kpm"}, "calibration": "knowledge"},
    "spt": {"adapter": {"method": "spt", "budget": float(LORA_PARAMS), "r": 8}},
    "compacter": {"adapter": {"method": "compacter", "placement": "llama"}},
    "plp": {"adapter": {"method": "plp", "r": 8}},
}
TARGETS_ALL_LINEAR = ["all-linear"]


def knowledge_text(folder: Path) -> Path:
    """The probe's facts as plain text rows ("mira lives in jarro"): CorDA-KPM's calibration set."""
    from pipelines.base import embedded_lm_data

    rows = [json.loads(line) for line in embedded_lm_data("knowledge_probe.jsonl").read_text().splitlines()]
    path = folder / "knowledge.jsonl"
    path.write_text("".join(json.dumps({"text": f"{r['prompt']} {r['choices'][r['answer']]}"}) + "\n" for r in rows))
    return path


def run_one(name: str, steps: int, device: str) -> dict:
    import torch

    from peft_core import config_from_dict
    from pipelines.base import embedded_lm_data
    from studio.llm import LlmJob, LlmTrainConfig, train_llm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = METHODS[name]
    adapter = dict(spec["adapter"])
    if adapter["method"] != "compacter":
        adapter["targets"] = TARGETS_ALL_LINEAR
    work = Path(tempfile.mkdtemp(prefix=f"llm_methods_{name}_"))
    train = LlmTrainConfig(steps=steps, checkpoint_every=10**9, **spec.get("train", {}))
    job = LlmJob(
        adapter=config_from_dict(adapter),
        train=train,
        data=embedded_lm_data("task_add_train.jsonl"),
        eval_data=[embedded_lm_data("task_add_test.jsonl"), embedded_lm_data("knowledge_probe.jsonl")],
        calibration_data=knowledge_text(work) if spec.get("calibration") == "knowledge" else None,
        cpu=device == "cpu",
    )
    result = train_llm(job, work / "run")
    peak = (
        result.peak_gib if result.peak_gib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "accuracy": round(result.after["task_add_test/accuracy"], 4),
        "knowledge": round(result.after["knowledge_probe/accuracy"], 4),
        "trainable_params": result.trainable_params,
        "wall_s": round(result.wall_s, 1),
        "peak_gib": round(peak, 3),
        "final_loss": round(result.losses[-1], 4),
        "task_loss": round(result.after["task_add_test/loss"], 4),
        "before": {
            "accuracy": round(result.before["task_add_test/accuracy"], 4),
            "knowledge": round(result.before["knowledge_probe/accuracy"], 4),
        },
        "adapter": job.adapter.to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "llm_methods.json"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one method, print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.device)), flush=True)
        return

    import torch
    import transformers

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    output = {
        "task": "task_add (embedded tiny LM, 19-way multiple choice, 400 test rows)",
        "steps": args.steps,
        "results": {},
        "device": platform.processor() or platform.machine() if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "schedule": "AdamW lr 3e-3, cosine, 10 warm-up steps, batch 16, seed 0, fp32",
        "peak_gib_means": "CPU: peak resident memory of the method's process; GPU: peak allocated",
    }
    for name in methods:
        log(f"[{name}] training {args.steps} steps ...")
        child = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--device", args.device],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            raise SystemExit(f"[{name}] failed:\n{child.stderr[-3000:]}")
        output["results"][name] = json.loads(lines[-1][len("RESULT ") :])
        log(f"[{name}] {output['results'][name]}")
        write_json(args.out, output)
    rows = [
        [name, r["accuracy"], r["knowledge"], r["trainable_params"], r["wall_s"], r["peak_gib"]]
        for name, r in output["results"].items()
    ]
    log(format_table(["method", "accuracy", "knowledge", "trainable", "wall s", "peak GiB"], rows))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
