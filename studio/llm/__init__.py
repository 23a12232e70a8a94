"""The LLM trainer: any peft_core method on any Hugging Face causal LM.

    job = LlmJob(data=Path("train.jsonl"), eval_data=[Path("test.jsonl")], base="embedded",
                 adapter=LoraConfig(targets=["all-linear"], r=8, alpha=16), train=LlmTrainConfig(steps=200))
    result = train_llm(job, "runs/my-run", on_event=print)

One module per concern, read in this order:
    config.py    LlmTrainConfig (how to train), LlmJob (what to train on what), job_record / job_from_record
    data.py      JSONL rows (every malformed line reported by number), chat rendering, tokenization with
                 response-only labels, packing, collate, StepSampler (which examples each step uses)
    model.py     where a model comes from, the method checked against its architecture on the meta
                 device, loading (optionally NF4), a merged copy
    evaluate.py  the causal-LM loss (optionally chunked), loss / perplexity, multiple-choice accuracy
    train.py     train_llm: check -> set up -> fit -> evaluate -> save, each a named step
    generate.py  load_for_generation, generate_text: talk to a trained run
The optimizer, LR schedule, accelerate, stop protocol and progress events come from the training
kit every trainer shares (pipelines.training).
"""

from studio.llm.config import DTYPES, LlmJob, LlmTrainConfig, job_from_record, job_record
from studio.llm.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE,
    Example,
    StepSampler,
    TokenizedData,
    collate,
    default_data,
    encode_row,
    read_jsonl,
    tokenize,
)
from studio.llm.evaluate import (
    LOGIT_TRANSFORMS,
    EvalSet,
    chunked_token_loss_sum,
    evaluate,
    evaluate_loss,
    load_eval_set,
    multiple_choice_accuracy,
    token_loss_sum,
)
from studio.llm.generate import generate_text, load_for_generation
from studio.llm.model import (
    check_method_on_model,
    load_model,
    load_tokenizer,
    model_source,
    save_merged,
)
from studio.llm.train import LlmResult, read_inputs, train_llm

__all__ = [
    "DTYPES",
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE",
    "LOGIT_TRANSFORMS",
    "EvalSet",
    "Example",
    "LlmJob",
    "LlmResult",
    "LlmTrainConfig",
    "StepSampler",
    "TokenizedData",
    "check_method_on_model",
    "chunked_token_loss_sum",
    "collate",
    "default_data",
    "encode_row",
    "evaluate",
    "evaluate_loss",
    "generate_text",
    "job_from_record",
    "job_record",
    "load_eval_set",
    "load_for_generation",
    "load_model",
    "load_tokenizer",
    "model_source",
    "multiple_choice_accuracy",
    "read_inputs",
    "read_jsonl",
    "save_merged",
    "token_loss_sum",
    "tokenize",
    "train_llm",
]
