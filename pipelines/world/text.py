"""The procedural text world the embedded tiny LM is pretrained on, and its held-out tasks.

A small village of invented people, each with a town, a job, a favourite food and a pet (fixed
facts: the world's "knowledge"), described by many sentence templates. From it come:

- `pretraining_text(seed, count)`: documents of fact sentences, everyday scenes and counts;
  a different seed gives held-out text with the same facts (for perplexity);
- `knowledge_probe()`: multiple-choice cloze questions on the facts ("mira lives in" -> town):
  the accuracy that fine-tuning should not destroy (what CorDA's knowledge-preserving mode protects);
- `addition_task(split, count)`: instruction/response word problems ("mira has 3 plums and buys 4
  more . how many plums does mira have ?" -> "7"), never in pretraining: the downstream
  fine-tuning task on which PEFT methods are compared;
- `addition_preferences(split, count, mistakes)`: the same task rows as preference pairs for DPO / ORPO
  (`assets/tiny-lm/data/preference_add_*.jsonl`): the right sum chosen, the pretrained model's own most
  likely wrong sum (`model_mistakes`) rejected.

Everything is lowercase words and spaced punctuation, so a word-level tokenizer covers the world
exactly (`build_tokenizer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PEOPLE = (
    "mira",
    "tolan",
    "bexa",
    "corin",
    "dalia",
    "evo",
    "fenna",
    "galt",
    "hesper",
    "ilo",
    "jorun",
    "kesa",
    "lunet",
    "marek",
    "nilla",
    "osric",
    "pella",
    "quen",
    "rusa",
    "sorel",
    "tamsin",
    "ulva",
    "varo",
    "wenna",
)
TOWNS = ("tolva", "brenn", "cardel", "dunmar", "elsby", "farrow", "glenna", "harl", "istra", "jarro")
JOBS = ("baker", "smith", "farmer", "weaver", "potter", "fisher", "miller", "tailor", "healer", "carver")
FOODS = ("plums", "bread", "cheese", "apples", "soup", "honey", "pears", "fish", "beans", "cakes")
PETS = ("owl", "cat", "dog", "goat", "hen", "fox", "toad", "crow")
PLACES = ("river", "forest", "sea", "hills", "lake")
COLOURS = ("red", "green", "blue", "yellow", "brown", "white", "black", "grey")
VERBS = ("saw", "followed", "found", "watched", "met")
NUMBERS = tuple(str(n) for n in range(21))

WORLD_SEED = 1234  # the facts are the world itself: fixed, independent of any sample stream
HELDOUT_SEED = 999_999  # held-out text for perplexity comes from this stream

# Sentence templates. Fields in braces; everything else is literal words and spaced punctuation.
FACT_TEMPLATES = {
    "town": (
        "{p} lives in {town} .",
        "{p} has a house in {town} .",
        "in {town} lives {p} .",
        "the home of {p} is {town} .",
    ),
    "job": ("{p} works as a {job} .", "{p} is a {job} .", "by trade {p} is a {job} .", "the {job} {p} works hard ."),
    "food": ("{p} likes {food} .", "{p} eats {food} every day .", "the favourite food of {p} is {food} ."),
    "pet": ("{p} has a pet {pet} .", "the pet of {p} is a {pet} .", "{p} walks with a {pet} ."),
    "place": ("{town} is near the {place} .", "the town of {town} lies by the {place} ."),
}
SCENE_TEMPLATES = (
    "the {colour} {pet} {verb} a {pet2} near the {place} .",
    "one day {p} {verb} a {colour} {pet} by the {place} .",
    "{p} and {p2} went to {town} .",
    "{p} gave {food} to {p2} .",
)
COUNT_TEMPLATE = "{p} has {n} {food} ."
# The downstream task: words here beyond the world ("buys", "more", "how", "many", ...) and the
# sums above 9 never occur in pretraining text.
TASK_TEMPLATE = "{p} has {a} {food} and buys {b} more . how many {food} does {p} have ?"

# The probe's question for each fact and the candidates it chooses among (the canonical phrasing).
PROBE_RELATIONS = {
    "town": ("{p} lives in", TOWNS),
    "job": ("{p} works as a", JOBS),
    "food": ("{p} likes", FOODS),
    "pet": ("{p} has a pet", PETS),
}

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_WORDS = ("###", "instruction", "response", ":")
# A plain instruction/response chat format; the LLM trainer renders data through it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}### instruction : {{ message['content'] }} "
    "{% else %}### response : {{ message['content'] }} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### response : {% endif %}"
)


@dataclass(frozen=True)
class Facts:
    """The fixed knowledge of the world: person -> attribute, town -> nearby place."""

    person: dict[str, dict[str, str]]
    town_place: dict[str, str]


def world_facts() -> Facts:
    rng = np.random.default_rng(WORLD_SEED)
    person = {
        p: {
            "town": str(rng.choice(TOWNS)),
            "job": str(rng.choice(JOBS)),
            "food": str(rng.choice(FOODS)),
            "pet": str(rng.choice(PETS)),
        }
        for p in PEOPLE
    }
    return Facts(person, {t: str(rng.choice(PLACES)) for t in TOWNS})


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _sentence(rng: np.random.Generator, facts: Facts) -> str:
    p, p2 = rng.choice(PEOPLE, size=2, replace=False).tolist()
    roll = rng.random()
    if roll < 0.6:  # a fact, in one of its phrasings
        relation = _pick(rng, tuple(FACT_TEMPLATES))
        town = facts.person[p]["town"]
        values = {"p": p, **facts.person[p], "place": facts.town_place[town]}
        return _pick(rng, FACT_TEMPLATES[relation]).format(**values)
    if roll < 0.9:
        pet, pet2 = rng.choice(PETS, size=2, replace=False).tolist()
        return _pick(rng, SCENE_TEMPLATES).format(
            p=p,
            p2=p2,
            pet=pet,
            pet2=pet2,
            colour=_pick(rng, COLOURS),
            verb=_pick(rng, VERBS),
            place=_pick(rng, PLACES),
            town=_pick(rng, TOWNS),
            food=_pick(rng, FOODS),
        )
    return COUNT_TEMPLATE.format(p=p, n=rng.integers(10), food=_pick(rng, FOODS))


def pretraining_text(seed: int, count: int) -> list[str]:
    """`count` documents of 4-8 sentences from stream `seed` (same facts for every seed)."""
    facts = world_facts()
    rng = np.random.default_rng(seed)
    return [" ".join(_sentence(rng, facts) for _ in range(rng.integers(4, 9))) for _ in range(count)]


def knowledge_probe() -> list[dict]:
    """Multiple-choice cloze items over every fact: {"prompt", "choices", "answer" (index)}."""
    facts = world_facts()
    items = []
    for p in PEOPLE:
        for relation, (template, candidates) in PROBE_RELATIONS.items():
            items.append(
                {
                    "prompt": template.format(p=p),
                    "choices": list(candidates),
                    "answer": candidates.index(facts.person[p][relation]),
                    "relation": relation,
                }
            )
    return items


def addition_task(split: str, count: int) -> list[dict]:
    """Word-problem additions, {"instruction", "response", "choices", "answer"}; splits differ in stream."""
    rng = np.random.default_rng({"train": 1, "test": 2}[split])
    rows = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(10, size=2))
        instruction = TASK_TEMPLATE.format(p=_pick(rng, PEOPLE), a=a, b=b, food=_pick(rng, FOODS))
        # Choices 0..18 make the same rows usable as a 19-way multiple-choice test.
        rows.append(
            {
                "instruction": instruction,
                "response": str(a + b),
                "choices": [str(n) for n in range(19)],
                "answer": a + b,
            }
        )
    return rows


# The held-out task as preference pairs. The rejected answer is the pretrained model's own mistake (its most
# likely wrong sum), as preference sets are usually made: sample the policy, keep what a judge marks wrong.
# (A nearby wrong sum, right +- 1 or 2, was tried first: a model that cannot add has nothing to learn from
# it, and DPO left held-out preference accuracy where it was, 0.46 -> 0.45.)
PREFERENCE_COUNTS = {"train": 256, "test": 128}


def model_mistakes(model, tokenizer, rows: list[dict]) -> list[int]:
    """For each task row, the index of the wrong choice the model scores highest (its likeliest mistake)."""
    mistakes = []
    for row, scores in zip(rows, choice_logits(model, tokenizer, rows, prompt_key="instruction")):
        scores = scores.clone()
        scores[row["answer"]] = float("-inf")
        mistakes.append(int(scores.argmax()))
    return mistakes


def addition_preferences(split: str, count: int, mistakes: list[int]) -> list[dict]:
    """The first `count` rows of `addition_task(split, ...)` (the shipped task_add_*.jsonl rows) as preference
    pairs in TRL's conversational form: {"prompt": [user turn], "chosen": [assistant: the sum],
    "rejected": [assistant: mistakes[i], a wrong sum]}."""
    rows = addition_task(split, count)
    if len(mistakes) != len(rows) or any(m == row["answer"] for m, row in zip(mistakes, rows)):
        raise ValueError("mistakes: one wrong answer per task row")
    return [
        {
            "prompt": [{"role": "user", "content": row["instruction"]}],
            "chosen": [{"role": "assistant", "content": row["response"]}],
            "rejected": [{"role": "assistant", "content": str(wrong)}],
        }
        for row, wrong in zip(rows, mistakes)
    ]


def vocabulary() -> list[str]:
    """Every word of the text world, specials first; the word-level tokenizer's vocabulary."""
    templates = [t for group in FACT_TEMPLATES.values() for t in group]
    templates += [*SCENE_TEMPLATES, COUNT_TEMPLATE, TASK_TEMPLATE]
    template_words = {w for t in templates for w in re.sub(r"\{\w+\}", " ", t).split()}
    words = template_words | set(PEOPLE + TOWNS + JOBS + FOODS + PETS + PLACES + COLOURS + VERBS + NUMBERS)
    words |= set(CHAT_WORDS)
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`, with <s> prepended and a chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    # Split on whitespace and between word characters and punctuation ("?" and "###" are words).
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def lm_config(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """The embedded LM: a 4-layer Llama (grouped-query attention, tied embeddings), about 1M parameters."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


# ---------------------------------------------------------------------------------------------
# Measures on a causal LM (used by the recipe, the benchmark and the tests)
# ---------------------------------------------------------------------------------------------


def perplexity(model, tokenizer, documents: list[str], batch_size: int = 64) -> float:
    """Token-level perplexity of `model` on `documents` (each scored on its own, after <s>)."""
    import torch

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(documents), batch_size):
            batch = tokenizer(documents[start : start + batch_size], return_tensors="pt", padding=True)
            input_ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            targets, target_mask = input_ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total_nll += nll[target_mask].sum().item()
            total_tokens += int(target_mask.sum())
    return float(np.exp(total_nll / total_tokens))


def choice_logits(model, tokenizer, items: list[dict], prompt_key: str = "prompt") -> list:
    """Per item, the next-token logits of its `choices` after its prompt (a (len(choices),) tensor).

    Every choice here is one word (one token), so the comparison is of next-token log-probabilities.
    For instruction rows (`prompt_key="instruction"`) the prompt is rendered with the chat template.
    """
    import torch

    device = next(model.parameters()).device
    model.eval()
    scores = []
    with torch.no_grad():
        for item in items:
            prompt = item[prompt_key]
            if prompt_key == "instruction":
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            input_ids = torch.tensor([tokenizer(prompt).input_ids], device=device)
            next_logits = model(input_ids=input_ids).logits[0, -1]
            choice_ids = [tokenizer.convert_tokens_to_ids(choice) for choice in item["choices"]]
            scores.append(next_logits[choice_ids].float().cpu())
    return scores


def multiple_choice_accuracy(model, tokenizer, items: list[dict], prompt_key: str = "prompt") -> float:
    """Share of items whose highest-likelihood continuation among `choices` is the `answer`."""
    scores = choice_logits(model, tokenizer, items, prompt_key)
    return sum(int(int(s.argmax()) == item["answer"]) for s, item in zip(scores, items)) / len(items)
