"""Every chat-template family and tool format, checked character by character against hand-written expectations.

The expected strings are what LLaMA-Factory's templates (and so the models' own chat formats) produce for the same
messages; `<s>`/`</s>` are the char tokenizer's bos/eos.
"""

from __future__ import annotations

import pytest

from orchestrator.data import tools as tool_module
from orchestrator.data.templates import (
    EOS,
    Template,
    Token,
    get_template,
    known_templates,
    missing_stop_words,
    prepare_tokenizer,
    resolve_template,
    stop_token_ids,
)
from orchestrator.data.tools import (
    FunctionCall,
    extract_tool_calls,
    get_tool_format,
    known_tool_formats,
    render_tools,
)
from tests.helpers import CharTokenizer


class Tok(CharTokenizer):
    """The char tokenizer with a few more special tokens, whose eos can be replaced like a real tokenizer's."""

    SPECIAL = {**CharTokenizer.SPECIAL, "<|eot_id|>": 10, "<|eom_id|>": 11, "<end_of_turn>": 12, "<eos>": 13}

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @eos_token.setter
    def eos_token(self, token: str) -> None:
        self._eos_token = token
        self.eos_token_id = self.SPECIAL[token]


TOK = Tok()
CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def turns(template: Template | str, messages=CONVERSATION, system=None, tools=None, tokenizer=TOK):
    template = get_template(template) if isinstance(template, str) else template
    pairs = template.encode_turns(tokenizer, messages, system, tools)
    return [(tokenizer.decode_ids(prompt), tokenizer.decode_ids(response)) for prompt, response in pairs]


def prompt_text(template: Template | str, messages, system=None, tools=None):
    template = get_template(template) if isinstance(template, str) else template
    return TOK.decode_ids(template.encode_prompt(TOK, messages, system, tools))


IM_SYSTEM = "<|im_start|>system\nS<|im_end|>\n"
IM_TURNS = [
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "yo<|im_end|>\n"),
    ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>\n"),
]
GEMMA = [
    ("<s><start_of_turn>user\nS\n\nhi<end_of_turn>\n<start_of_turn>model\n", "yo<end_of_turn>\n"),
    ("<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", "4<end_of_turn>\n"),
]
DEEPSEEK3 = [
    ("<s>S<\uff5cUser\uff5c>hi<\uff5cAssistant\uff5c>", "yo</s>"),
    ("<\uff5cUser\uff5c>2+2?<\uff5cAssistant\uff5c>", "4</s>"),
]
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
LLAMA3_USER = (
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)
COHERE_USER = "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"

# System "S", then hi -> yo, 2+2? -> 4.
EXPECTED_TURNS = {
    "default": [
        ("System: S</s>\nHuman: hi</s>\nAssistant:", "yo</s>\n"),
        ("Human: 2+2?</s>\nAssistant:", "4</s>\n"),
    ],
    "empty": [("Shi", "yo"), ("2+2?", "4")],
    "alpaca": [
        ("S### Instruction:\nhi\n\n### Response:\n", "yo</s>\n\n"),
        ("### Instruction:\n2+2?\n\n### Response:\n", "4</s>\n\n"),
    ],
    "vicuna": [("SUSER: hi ASSISTANT:", "yo</s>"), ("USER: 2+2? ASSISTANT:", "4</s>")],
    "chatml": [(IM_SYSTEM + IM_TURNS[0][0], IM_TURNS[0][1]), IM_TURNS[1]],
    "qwen": [(IM_SYSTEM + IM_TURNS[0][0], IM_TURNS[0][1]), IM_TURNS[1]],
    "qwen3": [
        (IM_SYSTEM + IM_TURNS[0][0], EMPTY_THOUGHT + IM_TURNS[0][1]),
        (IM_TURNS[1][0], EMPTY_THOUGHT + IM_TURNS[1][1]),
    ],
    "qwen3_nothink": [(IM_SYSTEM + IM_TURNS[0][0], IM_TURNS[0][1]), IM_TURNS[1]],
    "yi": [(IM_SYSTEM + IM_TURNS[0][0], IM_TURNS[0][1]), IM_TURNS[1]],
    "intern2": [("<s>" + IM_SYSTEM + IM_TURNS[0][0], IM_TURNS[0][1]), IM_TURNS[1]],
    "llama2": [
        ("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST]", "yo</s>"),
        ("<s>[INST] 2+2? [/INST]", "4</s>"),
    ],
    "llama3": [
        (
            "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>" + LLAMA3_USER.format("hi"),
            "yo<|eot_id|>",
        ),
        (LLAMA3_USER.format("2+2?"), "4<|eot_id|>"),
    ],
    "mistral": [("<s>[INST] S\n\nhi[/INST]", " yo</s>"), ("[INST] 2+2?[/INST]", " 4</s>")],
    "gemma": GEMMA,
    "gemma2": GEMMA,
    "gemma3": GEMMA,
    "phi": [
        ("<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n", "yo<|end|>\n"),
        ("<|user|>\n2+2?<|end|>\n<|assistant|>\n", "4<|end|>\n"),
    ],
    "phi4": [
        (
            "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>hi<|im_end|>"
            "<|im_start|>assistant<|im_sep|>",
            "yo<|im_end|>",
        ),
        ("<|im_start|>user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>", "4<|im_end|>"),
    ],
    "deepseek": [("<s>S\n\nUser: hi\n\nAssistant:", "yo</s>"), ("User: 2+2?\n\nAssistant:", "4</s>")],
    "deepseek3": DEEPSEEK3,
    "deepseekr1": [(DEEPSEEK3[0][0], EMPTY_THOUGHT + "yo</s>"), (DEEPSEEK3[1][0], EMPTY_THOUGHT + "4</s>")],
    "glm4": [
        ("[gMASK]<sop><|system|>\nS<|user|>\nhi<|assistant|>", "\nyo"),
        ("<|user|>\n2+2?<|assistant|>", "\n4"),
    ],
    "baichuan2": [("S<reserved_106>hi<reserved_107>", "yo"), ("<reserved_106>2+2?<reserved_107>", "4")],
    "cohere": [
        ("<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>S<|END_OF_TURN_TOKEN|>" + COHERE_USER.format("hi"), "yo</s>"),
        (COHERE_USER.format("2+2?"), "4</s>"),
    ],
    "zephyr": [
        ("<|system|>\nS</s><|user|>\nhi</s><|assistant|>\n", "yo</s>"),
        ("<|user|>\n2+2?</s><|assistant|>\n", "4</s>"),
    ],
    "openchat": [
        ("<s>SGPT4 Correct User: hi</s>GPT4 Correct Assistant:", "yo</s>"),
        ("GPT4 Correct User: 2+2?</s>GPT4 Correct Assistant:", "4</s>"),
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TURNS))
def test_two_turns_with_a_system_message(name):
    assert turns(name, system="S") == EXPECTED_TURNS[name]


def test_every_template_has_an_expectation():
    assert set(EXPECTED_TURNS) == set(known_templates())


@pytest.mark.parametrize(
    ("name", "first_prompt"),
    [
        (
            "qwen",
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
        ),
        ("vicuna", "A chat between a curious user and an artificial intelligence assistant. The assistant gives "),
        ("zephyr", "<|system|>\nYou are Zephyr, a helpful assistant.</s><|user|>\nhi"),
        ("intern2", "<s><|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM"),
    ],
)
def test_default_system_is_used_when_the_example_has_none(name, first_prompt):
    assert turns(name)[0][0].startswith(first_prompt)


def test_intern2_default_system_ends_exactly():
    assert turns("intern2")[0][0].endswith(
        "chosen by the user such as English and 中文.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("name", "first_prompt"),
    [
        ("baichuan2", "<reserved_106>hi<reserved_107>"),
        ("deepseek3", "<s><\uff5cUser\uff5c>hi<\uff5cAssistant\uff5c>"),
        ("openchat", "<s>GPT4 Correct User: hi</s>GPT4 Correct Assistant:"),
        ("llama2", "<s>[INST] hi [/INST]"),
        ("gemma", "<s><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"),
        ("mistral", "<s>[INST] hi[/INST]"),
        ("qwen3", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_no_system_text_without_a_system_message(name, first_prompt):
    assert turns(name)[0][0] == first_prompt


def test_efficient_eos_templates_end_answers_without_eos():
    for name in ("glm4", "baichuan2", "gemma2"):
        template = get_template(name)
        assert template.efficient_eos
        assert all(TOK.eos_token_id not in response for _, response in template.encode_turns(TOK, CONVERSATION))
    assert Template("x", efficient_eos=True).assistant_slots == ("{{content}}",)
    assert Template("x").assistant_slots == ("{{content}}", EOS)


def test_replace_eos_makes_the_first_stop_word_the_eos():
    tokenizer = Tok()
    assert prepare_tokenizer(tokenizer, get_template("llama3")) == []
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.eos_token_id == 10
    assert stop_token_ids(tokenizer, get_template("llama3")) == [10, 11]


def test_stop_words_without_replace_eos_keep_the_eos():
    tokenizer = Tok()
    assert prepare_tokenizer(tokenizer, get_template("gemma2")) == []
    assert tokenizer.eos_token == "</s>"
    assert stop_token_ids(tokenizer, get_template("gemma2")) == [2, 12, 13]


def test_missing_stop_words_are_reported():
    assert prepare_tokenizer(Tok(), get_template("phi")) == ["<|end|>"]
    assert prepare_tokenizer(Tok(), get_template("glm4")) == ["<|user|>", "<|observation|>"]


class NoEomTok(Tok):
    SPECIAL = {k: v for k, v in Tok.SPECIAL.items() if k != "<|eom_id|>"}


def test_a_missing_stop_word_no_example_contains_is_left_out_not_refused():
    """llama3 on a tokenizer with <|eot_id|> but no <|eom_id|>: the examples never contain <|eom_id|>, so training
    needs no embedding for it and the model cannot emit it; it is left out of the stop tokens instead of refused."""
    tokenizer, template = NoEomTok(), get_template("llama3")
    assert missing_stop_words(tokenizer, template) == ["<|eom_id|>"]
    assert prepare_tokenizer(tokenizer, template) == []
    assert tokenizer.eos_token == "<|eot_id|>" and stop_token_ids(tokenizer, template) == [10]
    ids = [i for source, target in template.encode_turns(tokenizer, CONVERSATION) for i in source + target]
    assert 10 in ids and None not in ids  # <|eot_id|> closes each turn; nothing unknown is encoded


def test_stop_words_and_eos_flags_per_family():
    flags = {
        name: (t.stop_words, t.replace_eos, t.efficient_eos) for name in known_templates() for t in [get_template(name)]
    }
    assert flags["qwen3"] == (("<|im_end|>",), True, False)
    assert flags["yi"] == (("<|im_end|>",), False, False)
    assert flags["gemma"] == (("<end_of_turn>",), True, False)
    assert flags["gemma2"] == (("<eos>", "<end_of_turn>"), False, True)
    assert flags["phi4"] == (("<|im_end|>",), True, False)
    assert flags["glm4"] == (("<|user|>", "<|observation|>"), False, True)
    assert flags["mistral"] == ((), False, False)


THOUGHT_CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>\nA\n</think>\n\nyo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nB\n</think>\n\n4"},
]
P1, P2 = IM_TURNS[0][0], IM_TURNS[1][0]
THINKING = [(P1, EMPTY_THOUGHT + "yo<|im_end|>\n"), (P2, EMPTY_THOUGHT + "4<|im_end|>\n")]
NOT_THINKING = [(P1 + EMPTY_THOUGHT, "yo<|im_end|>\n"), (P2 + EMPTY_THOUGHT, "4<|im_end|>\n")]
KEPT_THOUGHTS = [(P1, "<think>\nA\n</think>\n\nyo<|im_end|>\n"), (P2, "<think>\nB\n</think>\n\n4<|im_end|>\n")]


@pytest.mark.parametrize(
    ("messages", "enable_thinking", "expected"),
    [
        (CONVERSATION, True, THINKING),
        (CONVERSATION, False, NOT_THINKING),
        (CONVERSATION, None, NOT_THINKING),
        (THOUGHT_CONVERSATION, True, KEPT_THOUGHTS),
        (THOUGHT_CONVERSATION, False, NOT_THINKING),
        (THOUGHT_CONVERSATION, None, KEPT_THOUGHTS),
    ],
)
def test_qwen3_thoughts_in_training(messages, enable_thinking, expected):
    assert turns(resolve_template("qwen3", enable_thinking=enable_thinking), messages) == expected


def test_qwen3_nothink_leaves_answers_alone():
    assert turns("qwen3_nothink", THOUGHT_CONVERSATION) == KEPT_THOUGHTS
    assert turns("qwen3_nothink") == IM_TURNS


@pytest.mark.parametrize(("enable_thinking", "tail"), [(True, ""), (False, EMPTY_THOUGHT)])
def test_qwen3_prompt_drops_earlier_thoughts(enable_thinking, tail):
    template = resolve_template("qwen3", enable_thinking=enable_thinking)
    assert prompt_text(template, THOUGHT_CONVERSATION[:3]) == P1 + "yo<|im_end|>\n" + P2 + tail


def test_stripped_thoughts_take_the_newlines_after_them():
    messages = [CONVERSATION[0], {"role": "assistant", "content": "<think>\nA\n</think>\n\n\n\nyo"}, CONVERSATION[2]]
    assert prompt_text("qwen3", messages) == P1 + "yo<|im_end|>\n" + P2


def test_qwen3_nothink_prompt_keeps_history_as_given():
    assert prompt_text("qwen3_nothink", THOUGHT_CONVERSATION[:3]) == P1 + THOUGHT_CONVERSATION[1]["content"] + (
        "<|im_end|>\n" + P2
    )


HISTORY = P1 + "yo<|im_end|>\n" + P2


@pytest.mark.parametrize(
    ("messages", "enable_thinking", "expected"),
    [
        (CONVERSATION, True, (HISTORY, EMPTY_THOUGHT + "4<|im_end|>\n")),
        (CONVERSATION, False, (HISTORY + EMPTY_THOUGHT, "4<|im_end|>\n")),
        (CONVERSATION, None, (HISTORY + EMPTY_THOUGHT, "4<|im_end|>\n")),
        (THOUGHT_CONVERSATION, True, (HISTORY, "<think>\nB\n</think>\n\n4<|im_end|>\n")),
        (THOUGHT_CONVERSATION, False, (HISTORY + EMPTY_THOUGHT, "4<|im_end|>\n")),
        (THOUGHT_CONVERSATION, None, (HISTORY, "<think>\nB\n</think>\n\n4<|im_end|>\n")),
    ],
)
def test_qwen3_one_turn_keeps_only_the_last_thought(messages, enable_thinking, expected):
    prompt, response = resolve_template("qwen3", enable_thinking=enable_thinking).encode_oneturn(TOK, messages)
    assert (TOK.decode_ids(prompt), TOK.decode_ids(response)) == expected


def test_one_turn_of_a_plain_template_joins_the_turns():
    prompt, response = get_template("llama3").encode_oneturn(TOK, CONVERSATION, "S")
    (p1, r1), (p2, r2) = EXPECTED_TURNS["llama3"]
    assert (TOK.decode_ids(prompt), TOK.decode_ids(response)) == (p1 + r1 + p2, r2)


def test_enable_thinking_only_changes_reasoning_templates():
    assert resolve_template("qwen", enable_thinking=False) is get_template("qwen")
    assert resolve_template("qwen3", enable_thinking=False).enable_thinking is False


def test_encode_prompt_matches_the_turns_and_ends_after_an_observation():
    messages = CONVERSATION[:3]
    assert (
        prompt_text("llama3", messages, system="S")
        == "".join(p + r for p, r in EXPECTED_TURNS["llama3"])[: -len("4<|eot_id|>")]
    )
    call = {"role": "function", "content": '{"name": "f", "arguments": {}}'}
    observed = [messages[0], call, {"role": "observation", "content": "42"}]
    assert prompt_text("qwen", observed, system="S").endswith(
        "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


TOOL = (
    '{"name": "get_weather", "description": "Get weather", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string", "description": "City"}}, "required": ["city"]}}'
)
TOOLS = f"[{TOOL}]"
WRAPPED = '{"type": "function", "function": ' + TOOL + "}"
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "function", "content": CALL},
    {"role": "observation", "content": '{"temp": 20}'},
    {"role": "assistant", "content": "It is 20 degrees."},
]
TOOL_JSON_INDENTED = (
    "{\n"
    '    "name": "get_weather",\n'
    '    "description": "Get weather",\n'
    '    "parameters": {\n'
    '        "type": "object",\n'
    '        "properties": {\n'
    '            "city": {\n'
    '                "type": "string",\n'
    '                "description": "City"\n'
    "            }\n"
    "        },\n"
    '        "required": [\n'
    '            "city"\n'
    "        ]\n"
    "    }\n"
    "}"
)
WRAPPED_INDENTED = '{\n    "type": "function",\n    "function": ' + TOOL_JSON_INDENTED.replace("\n", "\n    ") + "\n}"
DEFAULT_TOOL_TEXT = (
    "You have access to the following tools:\n"
    "> Tool Name: get_weather\nTool Description: Get weather\nTool Args:\n  - city (string, required): City\n\n"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [get_weather])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
)
QWEN_TOOL_TEXT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + WRAPPED
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
LLAMA3_TOOL_TEXT = (
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n" + WRAPPED_INDENTED + "\n\n"
)
GLM4_TOOL_TEXT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n"
    + TOOL_JSON_INDENTED
    + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
)

EXPECTED_TOOL_TURNS = {
    "default": [
        (
            "System: " + DEFAULT_TOOL_TEXT + "</s>\nHuman: Weather in Paris?</s>\nAssistant:",
            'Action: get_weather\nAction Input: {"city": "Paris"}</s>\n',
        ),
        ('Human: {"temp": 20}</s>\nAssistant:', "It is 20 degrees.</s>\n"),
    ],
    "qwen": [
        (
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
            + QWEN_TOOL_TEXT
            + "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n",
            "<tool_call>\n" + CALL + "\n</tool_call><|im_end|>\n",
        ),
        (
            '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
            "It is 20 degrees.<|im_end|>\n",
        ),
    ],
    "llama3": [
        (
            "<s><|start_header_id|>system<|end_header_id|>\n\n"
            + LLAMA3_TOOL_TEXT
            + "<|eot_id|>"
            + LLAMA3_USER.format("Weather in Paris?"),
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        ),
        (
            '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 20}<|eot_id|>'
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "It is 20 degrees.<|eot_id|>",
        ),
    ],
    "mistral": [
        (
            "<s>[INST] [AVAILABLE_TOOLS] [" + WRAPPED + "][/AVAILABLE_TOOLS]\n\nWeather in Paris?[/INST]",
            "[TOOL_CALLS] [" + CALL + "]</s>",
        ),
        ('[TOOL_RESULTS] {"content": {"temp": 20}}[/TOOL_RESULTS]', " It is 20 degrees.</s>"),
    ],
    "glm4": [
        (
            "[gMASK]<sop><|system|>\n" + GLM4_TOOL_TEXT + "<|user|>\nWeather in Paris?<|assistant|>",
            'get_weather\n{"city": "Paris"}',
        ),
        ('<|observation|>\n{"temp": 20}<|assistant|>', "\nIt is 20 degrees."),
    ],
}


@pytest.fixture
def fixed_date(monkeypatch):
    monkeypatch.setattr(tool_module, "_today", lambda: "26 Jul 2024")


@pytest.mark.parametrize("name", sorted(EXPECTED_TOOL_TURNS))
def test_tool_conversation_per_tool_format(name, fixed_date):
    assert get_template(name).tool_format == name
    assert turns(name, TOOL_CONVERSATION, tools=TOOLS) == EXPECTED_TOOL_TURNS[name]


def test_every_required_tool_format_is_known():
    assert {"default", "qwen", "llama3", "mistral", "glm4"} <= set(known_tool_formats())


def test_tool_format_override_uses_plain_answer_slots():
    tokenizer = Tok()
    template = resolve_template("qwen", tool_format="default")
    assert prepare_tokenizer(tokenizer, template) == []
    (first, _), (_, last) = turns(template, TOOL_CONVERSATION, tools=TOOLS, tokenizer=tokenizer)
    assert first == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        + DEFAULT_TOOL_TEXT
        + "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    response = turns(template, TOOL_CONVERSATION[:2], tools=TOOLS, tokenizer=tokenizer)[0][1]
    assert response == 'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>'
    assert last == "It is 20 degrees.<|im_end|>\n"


def test_default_system_override():
    assert turns(resolve_template("qwen", default_system="Be brief."))[0][0].startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"
    )
    assert turns(resolve_template("qwen", default_system=""))[0][0] == IM_TURNS[0][0]
    assert resolve_template("qwen").default_system == get_template("qwen").default_system
    assert turns(resolve_template("qwen", default_system="D"), system="S")[0][0].startswith(IM_SYSTEM)


def test_an_empty_tool_list_still_opens_the_system_block():
    assert turns("qwen3_nothink", CONVERSATION[:2], tools="[]")[0][0] == "<|im_start|>system\n<|im_end|>\n" + P1


def test_function_call_keeps_its_thought_in_front():
    messages = [TOOL_CONVERSATION[0], {"role": "function", "content": "<think>\nplan\n</think>\n\n" + CALL}]
    assert turns("qwen3", messages)[0][1] == "<think>\nplan\n</think>\n\n<tool_call>\n" + CALL + (
        "\n</tool_call><|im_end|>\n"
    )


def test_function_call_in_tool_call_words_keeps_the_text_around_it():
    messages = [TOOL_CONVERSATION[0], {"role": "function", "content": f"Let me check.<tool_call>{CALL}</tool_call>"}]
    assert turns("qwen", messages)[0][1] == "Let me check.<tool_call>\n" + CALL + "\n</tool_call><|im_end|>\n"


SECOND_CALL = '{"name": "get_time", "arguments": {"zone": "CET"}}'
PARALLEL = f"[{CALL}, {SECOND_CALL}]"


@pytest.mark.parametrize(
    ("name", "response"),
    [
        ("qwen", f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{SECOND_CALL}\n</tool_call><|im_end|>\n"),
        (
            "llama3",
            '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
            '{"name": "get_time", "parameters": {"zone": "CET"}}]<|eot_id|>',
        ),
        ("mistral", f"[TOOL_CALLS] {PARALLEL}</s>"),
        (
            "default",
            'Action: get_weather\nAction Input: {"city": "Paris"}\nAction: get_time\nAction Input: {"zone": "CET"}</s>\n',
        ),
    ],
)
def test_parallel_function_calls(name, response):
    assert turns(name, [TOOL_CONVERSATION[0], {"role": "function", "content": PARALLEL}])[0][1] == response


def test_glm4_refuses_parallel_calls():
    with pytest.raises(ValueError, match="parallel"):
        turns("glm4", [TOOL_CONVERSATION[0], {"role": "function", "content": PARALLEL}])


def test_default_tool_text_lists_enums_items_and_openai_style_tools():
    tools = (
        '[{"type": "function", "function": {"name": "search", "description": "Search", "parameters": '
        '{"type": "object", "properties": {"q": {"type": "string", "description": "Query"}, '
        '"mode": {"type": "string", "description": "Mode", "enum": ["fast", "deep"]}, '
        '"tags": {"type": "array", "description": "Tags", "items": {"type": "string"}}}, "required": ["q"]}}}, '
        '{"name": "noop", "parameters": {"type": "object", "properties": {}}}]'
    )
    assert render_tools("default", tools) == (
        "You have access to the following tools:\n"
        "> Tool Name: search\nTool Description: Search\nTool Args:\n"
        "  - q (string, required): Query\n"
        "  - mode (string): Mode, should be one of [fast, deep]\n"
        "  - tags (array): Tags, where each item should be string\n\n"
        "> Tool Name: noop\nTool Description: \nTool Args:\n\n"
        "Use the following format if using a tool:\n```\n"
        "Action: tool name (one of [search, noop])\n"
        "Action Input: the input to the tool, in a JSON format representing the kwargs "
        '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
    )
    assert render_tools("qwen", "[]") == ""


def test_bad_json_is_reported():
    with pytest.raises(ValueError, match="tool description"):
        render_tools("qwen", "not json")
    with pytest.raises(ValueError, match="function message"):
        turns("qwen", [TOOL_CONVERSATION[0], {"role": "function", "content": "get_weather(Paris)"}])


PARIS = [FunctionCall("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize(
    ("tool_format", "text"),
    [
        ("default", 'Action: get_weather\nAction Input: {"city": "Paris"}'),
        ("qwen", "<tool_call>\n" + CALL + "\n</tool_call>"),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
        ("mistral", "[" + CALL + "]"),
        ("glm4", 'get_weather\n{"city": "Paris"}'),
    ],
)
def test_tool_calls_are_extracted(tool_format, text):
    assert extract_tool_calls(tool_format, text) == PARIS
    assert extract_tool_calls(tool_format, "It is sunny.") == "It is sunny."


def test_template_extracts_with_its_own_format():
    assert get_template("llama3").extract_tool('{"name": "get_weather", "parameters": {"city": "Paris"}}') == PARIS
    assert get_template("qwen").extract_tool("<tool_call>\n" + CALL + "\n</tool_call>") == PARIS
    assert extract_tool_calls("default", "Action: f\nAction Input: {a}") == "Action: f\nAction Input: {a}"


def test_unknown_names_raise_key_error():
    for call in (
        lambda: get_template("nope"),
        lambda: resolve_template("nope"),
        lambda: resolve_template("qwen", tool_format="nope"),
        lambda: get_tool_format("nope"),
        lambda: Template("x", tool_format="nope"),
    ):
        with pytest.raises(KeyError):
            call()


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="role"):
        turns("qwen", [{"role": "system", "content": "S"}, {"role": "assistant", "content": "a"}])


def test_named_tokens_and_round_index():
    template = Template("x", user=(Token("<|im_start|>"), "[Round {{idx}}] {{content}}"), assistant=("{{content}}",))
    pairs = template.encode_turns(TOK, CONVERSATION)
    assert pairs[0][0][0] == 3
    assert [(TOK.decode_ids(p), TOK.decode_ids(r)) for p, r in pairs] == [
        ("<|im_start|>[Round 0] hi", "yo"),
        ("<|im_start|>[Round 1] 2+2?", "4"),
    ]
