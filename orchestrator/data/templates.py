"""Prompt templates: how a conversation becomes token ids, turn by turn, as LLaMA-Factory builds them.

A template is a set of slot lists. A slot is literal text (with `{{content}}` standing for the message),
`BOS`/`EOS` for the tokenizer's own special tokens, or `Token("<x>")` for a named special token. Special tokens
written inside literal text (e.g. "<|im_start|>") are left to `tokenizer.encode`, which maps them to one id.

Messages are {"role", "content"} dicts: user or observation (a tool result) at even positions, assistant or
function (a tool call, JSON) at odd positions. The system text (plus the tools, rendered by the template's tool
format) goes before the first message, or into the first user message for templates that fuse it (llama2 style).
Reasoning templates (qwen3) add an empty `<think>` block to answers that have none, in the response (trained) when
thinking is enabled and in the prompt otherwise, and strip earlier thoughts when thinking is disabled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .tools import extract_tool_calls, get_tool_format, render_function_call, render_tools


class _Special(str):
    pass


BOS = _Special("bos_token")
EOS = _Special("eos_token")


@dataclass(frozen=True)
class Token:
    """A special token spelled by name, encoded as one id."""

    name: str


Slot = str | _Special | Token
Slots = tuple[Slot, ...]
Message = dict[str, str]


class TokenizerLike(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, token: str) -> int: ...


@dataclass(frozen=True)
class Template:
    name: str
    user: Slots = ("{{content}}",)
    assistant: Slots | None = None  # None: "{{content}}" + EOS (or no EOS with efficient_eos)
    system: Slots = ("{{content}}",)
    prefix: Slots = ()
    observation: Slots | None = None  # None: the user slots
    function: Slots | None = None  # None: the assistant slots
    tool_format: str = "default"
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    fuse_system_into_user: bool = False  # llama2-style: system text prepended to the first user message
    reasoning: bool = False  # qwen3-style empty-thought handling
    enable_thinking: bool | None = True
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")

    def __post_init__(self) -> None:
        get_tool_format(self.tool_format)  # KeyError for an unknown format

    @property
    def assistant_slots(self) -> Slots:
        if self.assistant is not None:
            return self.assistant
        return _plain_answer(self.efficient_eos)

    @property
    def observation_slots(self) -> Slots:
        return self.user if self.observation is None else self.observation

    @property
    def function_slots(self) -> Slots:
        return self.assistant_slots if self.function is None else self.function

    def encode_turns(
        self,
        tokenizer: TokenizerLike,
        messages: list[Message],
        system: str | None = None,
        tools: str | None = None,
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per pair; the first prompt carries prefix, system and tools."""
        if self.reasoning and self.enable_thinking is False:
            messages = self._strip_answer_thoughts(messages)
        encoded = self._encode(tokenizer, messages, system, tools)
        pairs = [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded) - 1, 2)]
        if self.reasoning:
            pairs = [self._add_empty_thought(tokenizer, pair, messages[2 * k + 1]) for k, pair in enumerate(pairs)]
        return pairs

    def encode_oneturn(
        self,
        tokenizer: TokenizerLike,
        messages: list[Message],
        system: str | None = None,
        tools: str | None = None,
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids): every message before the last as one prompt, and the last message.

        LLaMA-Factory's encode_oneturn (pairwise, KTO, generation): reasoning templates drop the thoughts of earlier
        answers and add an empty thought to the last answer only.
        """
        if self.reasoning:
            keep_last = self.enable_thinking is not False
            messages = self._strip_answer_thoughts(messages, end=len(messages) - 1 if keep_last else None)
        encoded = self._encode(tokenizer, messages, system, tools)
        prompt = [token for ids in encoded[:-1] for token in ids]
        if self.reasoning:
            return self._add_empty_thought(tokenizer, (prompt, encoded[-1]), messages[-1])
        return prompt, encoded[-1]

    def encode_prompt(
        self,
        tokenizer: TokenizerLike,
        messages: list[Message],
        system: str | None = None,
        tools: str | None = None,
    ) -> list[int]:
        """Ids of a conversation ending in a user or observation message, ready for generation."""
        padded = [*messages, {"role": "assistant", "content": ""}]
        return self.encode_oneturn(tokenizer, padded, system, tools)[0]

    def extract_tool(self, text: str) -> Any:
        """Tool calls in generated text (a list of FunctionCall), or the text when it holds none."""
        return extract_tool_calls(self.tool_format, text)

    def _encode(
        self, tokenizer: TokenizerLike, messages: list[Message], system: str | None, tools: str | None
    ) -> list[list[int]]:
        system = system or self.default_system
        has_system = bool(system or tools)
        system_text = system + render_tools(self.tool_format, tools) if tools else system
        encoded: list[list[int]] = []
        for index, message in enumerate(messages):
            slots: list[Slot] = []
            fused = ""
            if index == 0:
                slots += self.prefix
                if has_system and self.fuse_system_into_user:
                    fused = _first_text(self.system, system_text)
                elif has_system:
                    slots += _fill(self.system, system_text)
            slots += self._message_slots(message, index, fused)
            encoded.append(_to_ids(tokenizer, slots))
        return encoded

    def _message_slots(self, message: Message, index: int, fused_system: str) -> list[Slot]:
        role, content = message["role"], message["content"]
        if role == "user":
            return _fill(self.user, fused_system + content, idx=str(index // 2))
        if role == "assistant":
            return _fill(self.assistant_slots, content)
        if role == "observation":
            return _fill(self.observation_slots, content)
        if role == "function":
            text = render_function_call(self.tool_format, content, self.thought_words, self.tool_call_words)
            return _fill(self.function_slots, text)
        raise ValueError(f"unknown message role {role!r} (expected user, assistant, observation or function)")

    def _strip_answer_thoughts(self, messages: list[Message], end: int | None = None) -> list[Message]:
        """Messages with the thoughts of the answers (odd positions) before `end` removed."""
        opening, closing = (re.escape(word) for word in self.thought_words)
        pattern = re.compile(f"{opening}(.*?){closing}", re.DOTALL)
        end = len(messages) if end is None else end
        return [
            {**m, "content": pattern.sub("", m["content"]).lstrip("\n")} if i % 2 and i < end else m
            for i, m in enumerate(messages)
        ]

    def _add_empty_thought(
        self, tokenizer: TokenizerLike, pair: tuple[list[int], list[int]], answer: Message
    ) -> tuple[list[int], list[int]]:
        if any(word.strip() in answer["content"] for word in self.thought_words):
            return pair
        prompt, response = pair
        empty = self._empty_thought_ids(tokenizer)
        return (prompt, empty + response) if self.enable_thinking else (prompt + empty, response)

    def _empty_thought_ids(self, tokenizer: TokenizerLike) -> list[int]:
        return tokenizer.encode("".join(self.thought_words), add_special_tokens=False)


def _plain_answer(efficient_eos: bool) -> Slots:
    return ("{{content}}",) if efficient_eos else ("{{content}}", EOS)


def _fill(slots: Slots, content: str, idx: str | None = None) -> list[Slot]:
    filled: list[Slot] = []
    for slot in slots:
        if type(slot) is str:
            slot = slot.replace("{{content}}", content, 1)
            if idx is not None:
                slot = slot.replace("{{idx}}", idx, 1)
        filled.append(slot)
    return filled


def _first_text(slots: Slots, content: str) -> str:
    first = _fill(slots, content)[0]
    if type(first) is not str:
        raise ValueError("a fused system template must start with text")
    return first


def _to_ids(tokenizer: TokenizerLike, slots: list[Slot]) -> list[int]:
    ids: list[int] = []
    for slot in slots:
        if isinstance(slot, Token):
            ids.append(tokenizer.convert_tokens_to_ids(slot.name))
        elif slot is BOS:
            if tokenizer.bos_token_id is not None:
                ids.append(tokenizer.bos_token_id)
        elif slot is EOS:
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        elif slot:
            ids += tokenizer.encode(slot, add_special_tokens=False)
    return ids


def _chatml(user: str = "user", assistant: str = "assistant", sep: str = "\n", end: str = "\n") -> dict[str, Slots]:
    """user/assistant/system slots of the <|im_start|> family."""
    return {
        "user": (f"<|im_start|>{user}{sep}{{{{content}}}}<|im_end|>{end}<|im_start|>{assistant}{sep}",),
        "assistant": (f"{{{{content}}}}<|im_end|>{end}",),
        "system": (f"<|im_start|>system{sep}{{{{content}}}}<|im_end|>{end}",),
    }


def _qwen(name: str, default_system: str = "", reasoning: bool = False) -> Template:
    return Template(
        name,
        **_chatml(),
        function=("{{content}}<|im_end|>\n",),
        observation=(
            "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        ),
        tool_format="qwen",
        default_system=default_system,
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=reasoning,
    )


def _gemma(name: str, stop_words: tuple[str, ...], efficient_eos: bool = False) -> Template:
    return Template(
        name,
        user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",),
        system=("{{content}}\n\n",),
        observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        prefix=(BOS,),
        stop_words=stop_words,
        efficient_eos=efficient_eos,
        replace_eos=not efficient_eos,
        fuse_system_into_user=True,
    )


def _deepseek3(name: str, reasoning: bool = False) -> Template:
    return Template(
        name, user=("<\uff5cUser\uff5c>{{content}}<\uff5cAssistant\uff5c>",), prefix=(BOS,), reasoning=reasoning
    )


_LLAMA3_TURN = "<|start_header_id|>{role}<|end_header_id|>\n\n{{{{content}}}}<|eot_id|>"
_LLAMA3_REPLY = "<|start_header_id|>assistant<|end_header_id|>\n\n"
_INTERNLM_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language "
    "chosen by the user such as English and 中文."
)
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_COHERE_TURN = "<|START_OF_TURN_TOKEN|><|{role}_TOKEN|>{{{{content}}}}<|END_OF_TURN_TOKEN|>"

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "default",
            user=("Human: {{content}}", EOS, "\nAssistant:"),
            assistant=("{{content}}", EOS, "\n"),
            system=("System: {{content}}", EOS, "\n"),
        ),
        Template("empty", assistant=("{{content}}",)),
        Template(
            "alpaca",
            user=("### Instruction:\n{{content}}\n\n### Response:\n",),
            assistant=("{{content}}", EOS, "\n\n"),
            default_system=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n"
            ),
        ),
        Template("vicuna", user=("USER: {{content}} ASSISTANT:",), default_system=_VICUNA_SYSTEM),
        Template(
            "chatml",
            **_chatml(),
            observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
            stop_words=("<|im_end|>", "<|im_start|>"),
            replace_eos=True,
        ),
        _qwen("qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        _qwen("qwen3", reasoning=True),
        _qwen("qwen3_nothink"),
        Template(
            "llama2",
            user=(BOS, "[INST] {{content}} [/INST]"),
            system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
            fuse_system_into_user=True,
        ),
        Template(
            "llama3",
            user=(_LLAMA3_TURN.format(role="user") + _LLAMA3_REPLY,),
            assistant=("{{content}}<|eot_id|>",),
            system=(_LLAMA3_TURN.format(role="system"),),
            function=("{{content}}<|eot_id|>",),
            observation=(_LLAMA3_TURN.format(role="ipython") + _LLAMA3_REPLY,),
            tool_format="llama3",
            prefix=(BOS,),
            stop_words=("<|eot_id|>", "<|eom_id|>"),
            replace_eos=True,
        ),
        Template(
            "mistral",
            user=("[INST] {{content}}[/INST]",),
            assistant=(" {{content}}", EOS),
            system=("{{content}}\n\n",),
            function=("[TOOL_CALLS] {{content}}", EOS),
            observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',),
            tool_format="mistral",
            prefix=(BOS,),
            fuse_system_into_user=True,
        ),
        _gemma("gemma", stop_words=("<end_of_turn>",)),
        _gemma("gemma2", stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True),
        _gemma("gemma3", stop_words=("<end_of_turn>",)),
        Template(
            "phi",
            user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
            assistant=("{{content}}<|end|>\n",),
            system=("<|system|>\n{{content}}<|end|>\n",),
            stop_words=("<|end|>",),
            replace_eos=True,
        ),
        Template(
            "phi4",
            **_chatml(sep="<|im_sep|>", end=""),
            stop_words=("<|im_end|>",),
            replace_eos=True,
        ),
        Template("deepseek", user=("User: {{content}}\n\nAssistant:",), system=("{{content}}\n\n",), prefix=(BOS,)),
        _deepseek3("deepseek3"),
        _deepseek3("deepseekr1", reasoning=True),
        Template(
            "glm4",
            user=("<|user|>\n{{content}}<|assistant|>",),
            assistant=("\n{{content}}",),
            system=("<|system|>\n{{content}}",),
            function=("{{content}}",),
            observation=("<|observation|>\n{{content}}<|assistant|>",),
            tool_format="glm4",
            prefix=("[gMASK]<sop>",),
            stop_words=("<|user|>", "<|observation|>"),
            efficient_eos=True,
        ),
        Template("yi", **_chatml(), stop_words=("<|im_end|>",)),
        Template("baichuan2", user=("<reserved_106>{{content}}<reserved_107>",), efficient_eos=True),
        Template("intern2", **_chatml(), prefix=(BOS,), default_system=_INTERNLM_SYSTEM, stop_words=("<|im_end|>",)),
        Template(
            "cohere",
            user=(_COHERE_TURN.format(role="USER") + "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",),
            system=(_COHERE_TURN.format(role="SYSTEM"),),
            prefix=(BOS,),
        ),
        Template(
            "zephyr",
            user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
            system=("<|system|>\n{{content}}", EOS),
            default_system="You are Zephyr, a helpful assistant.",
        ),
        Template(
            "openchat",
            user=("GPT4 Correct User: {{content}}", EOS, "GPT4 Correct Assistant:"),
            prefix=(BOS,),
        ),
    )
}


def known_templates() -> list[str]:
    return sorted(TEMPLATES)


def get_template(name: str | None) -> Template:
    """The named template (KeyError for an unknown name: the config validator reports it first)."""
    if name not in TEMPLATES:
        raise KeyError(name)
    return TEMPLATES[name]


def resolve_template(
    name: str,
    *,
    tool_format: str | None = None,
    default_system: str | None = None,
    enable_thinking: bool | None = True,
) -> Template:
    """The named template with a config's overrides, as LLaMA-Factory applies them.

    `tool_format` replaces the tool format and resets the function slots to the plain answer slots;
    `default_system` replaces the default system message (None keeps the template's own); `enable_thinking`
    only matters for reasoning templates (LLaMA-Factory's default is True).
    """
    template = get_template(name)
    changes: dict[str, Any] = {}
    if tool_format is not None:
        get_tool_format(tool_format)
        changes.update(tool_format=tool_format, function=_plain_answer(template.efficient_eos))
    if default_system is not None:
        changes["default_system"] = default_system
    if template.reasoning:
        changes["enable_thinking"] = enable_thinking
    return replace(template, **changes) if changes else template


def missing_stop_words(tokenizer: Any, template: Template) -> list[str]:
    """The template's stop words that the tokenizer's vocabulary lacks."""
    return [w for w in template.stop_words if tokenizer.convert_tokens_to_ids(w) in (None, tokenizer.unk_token_id)]


def in_inputs(template: Template, word: str) -> bool:
    """Whether the template writes `word` into the formatted examples (a slot spells it, or it becomes the eos)."""
    slots = (*template.user, *template.assistant_slots, *template.system, *template.prefix, *template.observation_slots,
             *template.function_slots)  # fmt: skip
    spelled = any(slot.name == word if isinstance(slot, Token) else word in str(slot) for slot in slots)
    return spelled or (template.replace_eos and template.stop_words[:1] == (word,))


def prepare_tokenizer(tokenizer: Any, template: Template) -> list[str]:
    """Make eos/pad match the template (as LLaMA-Factory does). Returns the stop words the vocabulary lacks that the
    formatted examples contain: those stop the run. A missing stop word the examples never contain (llama3's
    <|eom_id|> on a tokenizer with <|eot_id|> only) is left out of the stop tokens: no example needs its embedding
    and the model cannot emit a token its tokenizer lacks, so training is what LLaMA-Factory's (which adds it) is."""
    needed = [w for w in missing_stop_words(tokenizer, template) if in_inputs(template, w)]
    if needed:
        return needed
    if template.replace_eos and template.stop_words:
        tokenizer.eos_token = template.stop_words[0]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return []


def stop_token_ids(tokenizer: Any, template: Template) -> list[int]:
    """eos and the template's stop words the vocabulary has (an unknown word must not stop on the unk id)."""
    missing = set(missing_stop_words(tokenizer, template))
    ids = {tokenizer.eos_token_id}
    ids.update(tokenizer.convert_tokens_to_ids(word) for word in template.stop_words if word not in missing)
    return sorted(i for i in ids if i is not None)
