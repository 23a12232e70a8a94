"""The LLM's model: where it comes from, whether the method fits its architecture (checked on the
meta device, before any weight loads), loading it (optionally NF4), and a merged copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peft_core import AdapterError, get_method, methods_with
from peft_core import load as load_adapter
from pipelines.base import offline_hint, refuse_pickle_weights
from pipelines.errors import UserError
from studio.llm.config import DTYPES, LlmJob, LlmTrainConfig


def model_source(base: str) -> str:
    """A folder or hub id transformers can load ("embedded" -> the shipped tiny Llama)."""
    from pipelines.base import EMBEDDED_LM, EMBEDDED_LM_NAMES

    if base in EMBEDDED_LM_NAMES:
        if not (EMBEDDED_LM / "config.json").is_file():
            raise UserError(
                f"the embedded tiny LM is missing from {EMBEDDED_LM}; rebuild it with `studio pretrain-base`"
            )
        return str(EMBEDDED_LM)
    path = Path(base).expanduser()
    if path.is_dir():
        refuse_pickle_weights(path)  # pytorch_model.bin alone: never unpickled
    if path.exists():
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise UserError(f"language model {base!r} not found: no such folder, and not a hub id (owner/name)")
    return base


def loram_keep(train: LlmTrainConfig, num_layers: int) -> tuple[int, int]:
    first = train.loram_keep_first if train.loram_keep_first >= 0 else min(4, num_layers // 4)
    last = train.loram_keep_last if train.loram_keep_last >= 0 else min(2, num_layers // 4)
    return first, last


def check_method_on_model(job: LlmJob) -> None:
    """Fail before any weight is loaded: the method's targets and LoRAM's pruning against the
    architecture (a model built from its config on the meta device), 4-bit and 8-bit requirements."""
    from transformers import AutoConfig, AutoModelForCausalLM

    train, method = job.train, job.adapter.method
    capabilities = get_method(method).capabilities
    if train.load_in_4bit or train.optimizer == "adamw8bit":
        what = "--load-in-4bit (an NF4 base)" if train.load_in_4bit else "--optimizer adamw8bit"
        if job.cpu or not torch.cuda.is_available():
            raise UserError(f"{what} needs a CUDA GPU (bitsandbytes); on this machine train without it")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(f"{what} needs bitsandbytes: pip install 'peft-studio[quant]'") from None
    if train.load_in_4bit and not capabilities.quantized_base:
        raise UserError(
            f"method {method!r} cannot train on an NF4 base (it needs dense weights); "
            f"methods that can: {', '.join(methods_with('quantized_base'))}"
        )
    if train.loram_ratio > 0 and capabilities.loram_recovery is None:
        recoverable = methods_with("loram_recovery")
        raise UserError(
            f"LoRAM recovers {', '.join(recoverable)} adapters only, not {method!r}; "
            f"pick --method {' or '.join(recoverable)} with --loram-ratio"
        )
    if job.save_merged and not capabilities.mergeable:
        raise UserError(
            f"--save-merged: a {method!r} adapter cannot be merged into the weights "
            "(its update is not linear in them); keep the adapter"
        )
    if job.export_peft and not capabilities.lora_export:
        raise UserError(f"--export-peft: a {method!r} adapter has no exact low-rank form, so PEFT cannot load it")
    source = model_source(job.base)
    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"could not read the model config of {job.base!r}: {str(error).splitlines()[0]}") from None
    from peft_core import check_fits

    try:
        if train.loram_ratio > 0:
            from peft_core.methods import loram

            layers = loram.find_decoder_layers(skeleton)
            first, last = loram_keep(train, len(layers))
            if train.loram_strategy in ("random", "norm") and len(layers) - first - last <= 0:
                raise UserError(
                    f"LoRAM keeps the first {first} and last {last} of this model's {len(layers)} decoder "
                    "layers whole, so it would prune nothing; lower --loram-keep-first/--loram-keep-last"
                )
        check_fits(skeleton, job.adapter)  # the targets, and the rank against each one's shape
    except AdapterError as error:
        raise UserError(f"{method} does not fit {job.base!r} ({type(skeleton).__name__}): {error}") from None


def load_model(job: LlmJob, device: torch.device):
    """(model, tokenizer) on `device`, base frozen; NF4 projections when load_in_4bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, train = model_source(job.base), job.train
    kwargs: dict[str, Any] = {"dtype": DTYPES[train.base_dtype], "use_safetensors": True}
    if train.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if train.base_dtype == "float32" else DTYPES[train.base_dtype]
        kwargs.update(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
            device_map={"": device},
            dtype=compute,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise UserError(f"could not load language model {job.base!r}: {offline_hint(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    if not train.load_in_4bit:
        model.to(device)
    return model, tokenizer


def load_tokenizer(job: LlmJob):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_source(job.base))
    except OSError as error:
        raise UserError(f"could not load the tokenizer of {job.base!r}: {offline_hint(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_merged(job: LlmJob, adapter_dir: Path, out_dir: Path, tokenizer) -> Path:
    """A plain transformers model with the adapter folded in, from a fresh full-precision base on the
    CPU (so it also works after an NF4 or LoRAM run, where the trained model cannot take the merge)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[job.train.base_dtype]
    model = AutoModelForCausalLM.from_pretrained(model_source(job.base), dtype=dtype, use_safetensors=True)
    handle = load_adapter(model, adapter_dir)
    merged = handle.unload(merge=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
