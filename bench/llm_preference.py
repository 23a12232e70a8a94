"""Preference tuning on the embedded tiny LM: held-out preference accuracy of the base, after DPO and after ORPO.

    python bench/llm_preference.py                     # ~3 minutes on 2 CPU cores
    python bench/llm_preference.py --runs dpo --steps 100 --out /tmp/llm_preference.json

The data is the embedded preference set (`assets/tiny-lm/data/preference_add_{train,test}.jsonl`, written by
`pipelines.world.pretrain.write_preference_files`): the held-out addition task's word problems, the right sum
chosen and the base model's own likeliest wrong sum rejected (on-policy negatives, as preference sets are
usually built: the base's mistakes are nearly all "15", a bias DPO should remove); 256 training pairs (the
first 256 rows of task_add_train) and 128 held-out pairs (the first 128 of task_add_test). By construction
the base's preference accuracy is the share of these rows it already answers right. An earlier set with a
nearby wrong sum (right +- 1 or 2) asked for real addition, which this tiny model cannot learn from 256 rows:
DPO left held-out preference accuracy at chance (0.46 -> 0.45; SFT on the chosen answers 0.48).
Every run trains a LoRA
(r=8, alpha 16, all linear layers) through `studio.llm.train_llm` (the code `studio train-llm` runs) with the
trainer's default schedule: AdamW lr 3e-3, cosine after 10 warm-up steps, batch 16 (pairs, or rows for SFT),
seed 0, fp32; DPO beta 0.1 and ORPO lambda 0.1 (the defaults, untuned).

Reported per run (the base model is the baseline, measured before training):
- `preference_accuracy`: share of held-out pairs whose chosen response has the higher log-probability
  (summed over the response tokens only: the number and the end-of-turn token) than the rejected one;
  `train_preference_accuracy`: the same on the 256 training pairs;
- `preference_margin`: mean (log pi(chosen) - log pi(rejected)) over the held-out pairs;
- `task_accuracy`: 19-way multiple choice on the 400 task_add_test rows; `knowledge`: the 96-item probe of
  pretraining facts (what tuning should not forget);
- `sft_chosen`: for comparison, plain SFT on the chosen responses of the same 256 pairs (the
  task_add_train rows they come from), the same schedule.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, format_table, log, repo_on_path, write_json

repo_on_path()

RUNS = ("dpo", "orpo", "sft_chosen")
TRAIN_PAIRS = 256


def eval_files() -> list[Path]:
    from pipelines.base import embedded_lm_data

    return [
        embedded_lm_data("preference_add_test.jsonl"),
        embedded_lm_data("preference_add_train.jsonl"),
        embedded_lm_data("task_add_test.jsonl"),
        embedded_lm_data("knowledge_probe.jsonl"),
    ]


def measures(metrics: dict[str, float]) -> dict[str, float]:
    return {
        "preference_accuracy": round(metrics["preference_add_test/preference_accuracy"], 4),
        "preference_margin": round(metrics["preference_add_test/preference_margin"], 4),
        "train_preference_accuracy": round(metrics["preference_add_train/preference_accuracy"], 4),
        "task_accuracy": round(metrics["task_add_test/accuracy"], 4),
        "knowledge": round(metrics["knowledge_probe/accuracy"], 4),
    }


def run_one(name: str, steps: int, work: Path) -> tuple[dict, dict]:
    """(the run's measures, the base's measures) of one training run."""
    from peft_core import LoraConfig
    from pipelines.base import embedded_lm_data
    from studio.llm import LlmJob, LlmTrainConfig, train_llm

    if name == "sft_chosen":  # the task rows the training pairs were made from: their chosen answers
        data = work / "sft_chosen.jsonl"
        data.write_text(
            "\n".join(embedded_lm_data("task_add_train.jsonl").read_text().splitlines()[:TRAIN_PAIRS]) + "\n"
        )
        objective = "sft"
    else:
        data, objective = embedded_lm_data("preference_add_train.jsonl"), name
    job = LlmJob(
        adapter=LoraConfig(targets=["all-linear"], r=8, alpha=16.0),
        train=LlmTrainConfig(objective=objective, steps=steps, checkpoint_every=10**9),
        data=data,
        eval_data=eval_files(),
        cpu=True,
    )
    started = time.perf_counter()
    result = train_llm(job, work / name)
    out = {
        **measures(result.after),
        "final_loss": round(result.losses[-1], 4),
        "first_loss": round(result.losses[0], 4),
        "wall_s": round(time.perf_counter() - started, 1),
        "trainable_params": result.trainable_params,
    }
    return out, measures(result.before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "llm_preference.json"))
    args = parser.parse_args()

    import torch
    import transformers

    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    output = {
        "task": "embedded preference set: the held-out addition task, the right sum chosen, the base model's "
        "likeliest wrong sum rejected",
        "pairs": {"train": TRAIN_PAIRS, "held_out": 128},
        "steps": args.steps,
        "schedule": "LoRA r=8 alpha 16 all-linear; AdamW lr 3e-3, cosine, 10 warm-up steps, batch 16, seed 0, fp32; "
        "DPO beta 0.1, ORPO lambda 0.1",
        "baseline": None,
        "results": {},
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    work = Path(tempfile.mkdtemp(prefix="llm_preference_"))
    for name in runs:
        log(f"[{name}] training {args.steps} steps ...")
        result, base = run_one(name, args.steps, work)
        output["baseline"] = output["baseline"] or base
        assert base == output["baseline"], (base, output["baseline"])  # every run starts from the same base
        output["results"][name] = result
        log(f"[{name}] {result}")
        write_json(args.out, output)
    keys = ["preference_accuracy", "preference_margin", "train_preference_accuracy", "task_accuracy", "knowledge"]
    rows = [["base", *(output["baseline"][k] for k in keys), "-"]]
    rows += [[name, *(r[k] for k in keys), r["wall_s"]] for name, r in output["results"].items()]
    log(format_table(["run", "pref acc", "margin", "train pref acc", "task acc", "knowledge", "wall s"], rows))
    log(f"wrote {args.out}")
    log(json.dumps(output["baseline"]))


if __name__ == "__main__":
    main()
