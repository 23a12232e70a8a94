"""The LLM trainer: any peft_core method on any Hugging Face causal LM.

    job = LlmJob(data=Path("train.jsonl"), eval_data=[Path("test.jsonl")], base="embedded",
                 adapter=LoraConfig(targets=["all-linear"], r=8, alpha=16), train=LlmTrainConfig(steps=200))
    result = train_llm(job, "runs/my-run", on_event=print)

One module per concern, read in this order:
    config.py    LlmTrainConfig (how to train), LlmJob (what to train on what), job_record / job_from_record
    data.py      JSONL rows (every malformed line reported by number), chat rendering, tokenization with
                 response-only labels, packing, collate, StepSampler (which examples each step uses)
    preference.py  --objective dpo / orpo: preference pairs, response log-probs, the DPO and ORPO losses
                 (the DPO reference: the model with its adapter disabled), preference accuracy
    model.py     where a model comes from, the method checked against its architecture on the meta
                 device, loading (optionally NF4), a merged copy
    losses.py    the causal-LM loss on response tokens (optionally chunked over positions)
    evaluate.py  loss / perplexity, multiple-choice accuracy and preference accuracy on held-out sets
    train.py     train_llm: check -> set up -> fit -> evaluate -> save, each a named step
    generate.py  load_for_generation, generate_text: talk to a trained run
The optimizer, LR schedule, accelerate, stop protocol and progress events come from the training
kit every trainer shares (pipelines.training).
"""

from studio.llm.config import DTYPES, OBJECTIVES, LlmJob, LlmTrainConfig, job_from_record, job_record
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
    EvalSet,
    evaluate,
    evaluate_loss,
    load_eval_set,
    multiple_choice_accuracy,
)
from studio.llm.generate import generate_text, load_for_generation
from studio.llm.losses import LOGIT_TRANSFORMS, chunked_token_loss_sum, token_loss_sum
from studio.llm.model import (
    check_method_on_model,
    load_model,
    load_tokenizer,
    model_source,
    save_merged,
)
from studio.llm.preference import (
    PreferenceData,
    PreferencePair,
    dpo_losses,
    encode_pair,
    orpo_losses,
    preference_accuracy,
    preference_loss_sum,
    reference_logps,
    sequence_logps,
    tokenize_pairs,
)
from studio.llm.train import LlmResult, read_inputs, train_llm

__all__ = [
    "DTYPES",
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE",
    "LOGIT_TRANSFORMS",
    "OBJECTIVES",
    "EvalSet",
    "Example",
    "LlmJob",
    "LlmResult",
    "LlmTrainConfig",
    "PreferenceData",
    "PreferencePair",
    "StepSampler",
    "TokenizedData",
    "check_method_on_model",
    "chunked_token_loss_sum",
    "collate",
    "default_data",
    "dpo_losses",
    "encode_pair",
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
    "orpo_losses",
    "preference_accuracy",
    "preference_loss_sum",
    "read_inputs",
    "read_jsonl",
    "reference_logps",
    "save_merged",
    "sequence_logps",
    "token_loss_sum",
    "tokenize",
    "tokenize_pairs",
    "train_llm",
]
