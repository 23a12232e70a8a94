"""The procedural text world: deterministic, fully covered by the tokenizer, task held out of pretraining."""

from __future__ import annotations

from pipelines.world import text as world


def test_pretraining_text_is_deterministic():
    assert world.pretraining_text(5, 20) == world.pretraining_text(5, 20)
    assert world.pretraining_text(5, 20) != world.pretraining_text(6, 20)


def test_tokenizer_covers_the_world_without_unknowns():
    tokenizer = world.build_tokenizer()
    documents = world.pretraining_text(0, 200) + [row["instruction"] for row in world.addition_task("train", 50)]
    ids = [i for doc in tokenizer(documents).input_ids for i in doc]
    assert tokenizer.unk_token_id not in ids
    assert (
        tokenizer.decode(tokenizer("mira lives in tolva .").input_ids, skip_special_tokens=True)
        == "mira lives in tolva ."
    )


def test_downstream_task_is_absent_from_pretraining():
    corpus = " ".join(world.pretraining_text(0, 2000)).split()
    for word in ("buys", "how", "many", "?", "11", "18"):
        assert word not in corpus


def test_knowledge_probe_matches_the_facts():
    facts = world.world_facts()
    probe = world.knowledge_probe()
    assert len(probe) == len(world.PEOPLE) * len(world.PROBE_RELATIONS)
    for item in probe:
        person = item["prompt"].split()[0]
        assert item["choices"][item["answer"]] == facts.person[person][item["relation"]]


def test_addition_rows_are_correct_and_splits_differ():
    train, test = world.addition_task("train", 100), world.addition_task("test", 100)
    for row in train:
        words = row["instruction"].split()
        assert int(row["response"]) == int(words[2]) + int(words[6]) == row["answer"]
    assert [r["instruction"] for r in train] != [r["instruction"] for r in test]


def test_chat_template_renders_instruction_and_response():
    tokenizer = world.build_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what ?"}, {"role": "assistant", "content": "7"}], tokenize=False
    )
    assert text.split() == ["###", "instruction", ":", "what", "?", "###", "response", ":", "7", "</s>"]
