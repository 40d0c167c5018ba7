"""Templates and processors checked token by token with a char-level tokenizer (one id per character)."""

from __future__ import annotations

import pytest

from orchestrator.data.formats import convert_alpaca
from orchestrator.data.processors import (
    IGNORE_INDEX,
    ProcessorOptions,
    feedback_batch,
    pairwise_batch,
    pretrain_batch,
    split_budget,
    supervised_batch,
    supervised_example,
    unsupervised_batch,
)
from orchestrator.data.registry import DatasetSpec
from orchestrator.data.templates import TEMPLATES, get_template, known_templates
from orchestrator.stages import processor_name
from tests.helpers import CharTokenizer

TOK = CharTokenizer()
EMPTY = get_template("empty")
CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def decoded_turns(template_name: str, messages=CONVERSATION, system=None):
    turns = get_template(template_name).encode_turns(TOK, messages, system)
    return [(TOK.decode_ids(p), TOK.decode_ids(r)) for p, r in turns]


def test_default_template_turns():
    assert decoded_turns("default", system="S") == [
        ("System: S</s>\nHuman: hi</s>\nAssistant:", "yo</s>\n"),
        ("Human: 2+2?</s>\nAssistant:", "4</s>\n"),
    ]


def test_empty_template_has_no_markup():
    assert decoded_turns("empty") == [("hi", "yo"), ("2+2?", "4")]


def test_alpaca_template_uses_its_default_system():
    first_prompt = decoded_turns("alpaca")[0][0]
    assert first_prompt.startswith("Below is an instruction that describes a task.")
    assert first_prompt.endswith("### Instruction:\nhi\n\n### Response:\n")


def test_chatml_template():
    assert decoded_turns("chatml", system="S")[0] == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "yo<|im_end|>\n",
    )
    assert TEMPLATES["chatml"].replace_eos and TEMPLATES["chatml"].stop_words[0] == "<|im_end|>"


def test_encode_prompt_ends_ready_for_the_answer():
    ids = get_template("default").encode_prompt(TOK, [{"role": "user", "content": "hi"}])
    assert TOK.decode_ids(ids) == "Human: hi</s>\nAssistant:"


def test_known_templates_listed():
    assert {"default", "empty", "alpaca", "chatml"} <= set(known_templates())
    with pytest.raises(KeyError):
        get_template("nope")


@pytest.mark.parametrize(
    ("source", "target", "budget", "expected"),
    [(10, 3, 8, (5, 3)), (3, 10, 8, (3, 5)), (10, 10, 8, (4, 4)), (2, 2, 100, (2, 2)), (5, 5, 0, (0, 0))],
)
def test_split_budget_in_proportion(source, target, budget, expected):
    assert split_budget(source, target, budget) == expected


def example(messages, system=""):
    return {"prompt": messages[:-1], "response": messages[-1:], "system": system}


def test_supervised_labels_mask_prompts():
    opts = ProcessorOptions(cutoff_len=1000)
    out = supervised_example(TOK, get_template("default"), example(CONVERSATION), opts)
    prompt1 = TOK.encode("Human: hi</s>\nAssistant:")
    resp1 = TOK.encode("yo</s>\n")
    prompt2 = TOK.encode("Human: 2+2?</s>\nAssistant:")
    resp2 = TOK.encode("4</s>\n")
    assert out["input_ids"] == prompt1 + resp1 + prompt2 + resp2
    assert out["labels"] == [IGNORE_INDEX] * len(prompt1) + resp1 + [IGNORE_INDEX] * len(prompt2) + resp2


def test_train_on_prompt_and_mask_history():
    template = get_template("empty")
    on_prompt = supervised_example(TOK, template, example(CONVERSATION), ProcessorOptions(1000, train_on_prompt=True))
    assert on_prompt["labels"] == on_prompt["input_ids"]
    history = supervised_example(TOK, template, example(CONVERSATION), ProcessorOptions(1000, mask_history=True))
    assert history["input_ids"] == TOK.encode("hiyo2+2?4")
    assert history["labels"] == [IGNORE_INDEX] * 8 + TOK.encode("4")


def test_truncation_keeps_cutoff():
    long = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]
    out = supervised_example(TOK, get_template("empty"), example(long), ProcessorOptions(cutoff_len=20))
    assert len(out["input_ids"]) == 20
    assert out["input_ids"] == TOK.encode("x" * 10 + "y" * 10)


def test_invalid_examples_are_dropped_and_counted():
    bad = {"prompt": [], "response": [{"role": "assistant", "content": "a"}], "system": ""}
    no_answer = {"prompt": CONVERSATION[:1], "response": [], "system": ""}
    good = example(CONVERSATION[:2])
    result = supervised_batch(TOK, get_template("empty"), [bad, no_answer, good], ProcessorOptions(100))
    assert len(result.columns["input_ids"]) == 1
    assert sum(result.dropped.values()) == 2


def test_alpaca_conversion_with_history_and_system():
    spec = DatasetSpec("d", ("f.json",), "json", columns={"history": "history", "system": "sys"})
    row = {"instruction": "Do it", "input": "now", "output": "done", "history": [["q", "a"]], "sys": "be brief"}
    converted = convert_alpaca(row, spec)
    assert converted["prompt"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "Do it\nnow"},
    ]
    assert converted["response"] == [{"role": "assistant", "content": "done"}]
    assert converted["system"] == "be brief"


def text_example(text):
    return {"prompt": [{"role": "user", "content": text}], "response": [], "system": ""}


def test_pretrain_packing_concatenates_and_drops_the_tail():
    examples = [text_example("ab"), text_example("cd")]
    packed = pretrain_batch(TOK, EMPTY, examples, ProcessorOptions(cutoff_len=4, packing=True))
    assert packed.columns["input_ids"] == [TOK.encode("ab</s>c")]
    assert packed.columns["labels"] == packed.columns["input_ids"]
    unpacked = pretrain_batch(TOK, EMPTY, examples, ProcessorOptions(cutoff_len=2, packing=False))
    assert unpacked.columns["input_ids"] == [TOK.encode("ab"), TOK.encode("cd")]
    assert unpacked.truncated == 2


def ranked(question, chosen, rejected, system=""):
    return {"prompt": [{"role": "user", "content": question}], "system": system, "tools": "",
            "response": [{"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}]}  # fmt: skip


def test_pairwise_shares_the_prompt_and_masks_it():
    out = pairwise_batch(TOK, get_template("default"), [ranked("hi", "good", "bad")], ProcessorOptions(100))
    prompt = TOK.encode("Human: hi</s>\nAssistant:")
    assert out.columns["chosen_input_ids"] == [prompt + TOK.encode("good</s>\n")]
    assert out.columns["rejected_input_ids"] == [prompt + TOK.encode("bad</s>\n")]
    assert out.columns["chosen_labels"] == [[IGNORE_INDEX] * len(prompt) + TOK.encode("good</s>\n")]
    assert out.columns["rejected_labels"] == [[IGNORE_INDEX] * len(prompt) + TOK.encode("bad</s>\n")]


def test_pairwise_cuts_both_responses_to_one_budget_and_drops_unranked():
    long = ranked("q" * 20, "c" * 20, "r" * 4)
    single = {**ranked("x", "y", "z"), "response": [{"role": "assistant", "content": "y"}]}
    out = pairwise_batch(TOK, EMPTY, [long, single], ProcessorOptions(cutoff_len=10))
    assert out.columns["chosen_input_ids"] == [TOK.encode("q" * 5 + "c" * 5)]
    assert out.columns["rejected_input_ids"] == [TOK.encode("q" * 5 + "r" * 4)]
    assert out.truncated == 1 and sum(out.dropped.values()) == 1


def tagged(question, answer, tag):
    return {**example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}]),
            "tools": "", "kto_tag": tag}  # fmt: skip


def test_feedback_pairs_each_prompt_with_the_previous_answer_for_kl():
    out = feedback_batch(TOK, EMPTY, [tagged("a", "1", True), tagged("b", "2", False), tagged("c", "3", True)],
                         ProcessorOptions(100))  # fmt: skip
    assert [TOK.decode_ids(ids) for ids in out.columns["input_ids"]] == ["a1", "b2", "c3"]
    assert [TOK.decode_ids(ids) for ids in out.columns["kl_input_ids"]] == ["a3", "b1", "c2"]
    assert out.columns["kto_tags"] == [True, False, True]
    assert out.columns["labels"][0] == [IGNORE_INDEX, TOK.encode("1")[0]]


def test_unsupervised_prompt_ends_ready_and_labels_hold_the_reference():
    conversation = example(CONVERSATION)
    out = unsupervised_batch(TOK, get_template("default"), [conversation], ProcessorOptions(1000))
    assert TOK.decode_ids(out.columns["input_ids"][0]) == "Human: hi</s>\nAssistant:yo</s>\nHuman: 2+2?</s>\nAssistant:"
    assert TOK.decode_ids(out.columns["labels"][0]) == "4</s>\n"


@pytest.mark.parametrize(("stage", "name"), [("pt", "pretrain"), ("sft", "supervised"), ("rm", "pairwise"),
                                             ("dpo", "pairwise"), ("kto", "feedback"), ("ppo", "unsupervised")])  # fmt: skip
def test_each_stage_has_its_processor(stage, name):
    assert processor_name(stage) == name
    assert processor_name(stage, predict=True) == ("unsupervised" if stage == "sft" else name)
