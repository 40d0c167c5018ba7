"""Prompt templates: how a conversation becomes token ids, turn by turn, as LLaMA-Factory builds them.

A template is a set of slot lists. A slot is literal text (with `{{content}}` standing for the message),
`BOS`/`EOS` for the tokenizer's own special tokens, or `Token("<x>")` for a named special token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class _Special(str):
    pass


BOS = _Special("bos_token")
EOS = _Special("eos_token")


@dataclass(frozen=True)
class Token:
    """A special token spelled by name, encoded as one id."""

    name: str


Slot = str | _Special | Token


class TokenizerLike(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, token: str) -> int: ...


@dataclass(frozen=True)
class Template:
    name: str
    user: tuple[Slot, ...] = ("{{content}}",)
    assistant: tuple[Slot, ...] | None = None  # None: "{{content}}" + EOS (or no EOS with efficient_eos)
    system: tuple[Slot, ...] = ("{{content}}",)
    prefix: tuple[Slot, ...] = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    fuse_system_into_user: bool = False  # llama2-style: system text prepended to the first user message

    @property
    def assistant_slots(self) -> tuple[Slot, ...]:
        if self.assistant is not None:
            return self.assistant
        return ("{{content}}",) if self.efficient_eos else ("{{content}}", EOS)

    def encode_turns(
        self, tokenizer: TokenizerLike, messages: list[dict[str, str]], system: str | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per user/assistant pair; the first prompt carries prefix and system."""
        system = system or self.default_system
        encoded: list[list[int]] = []
        for index, message in enumerate(messages):
            slots: list[Slot] = []
            system_text = ""
            if index == 0:
                slots += self.prefix
                if system:
                    if self.fuse_system_into_user:
                        system_text = _render_text(self.system, system)
                    else:
                        slots += _fill(self.system, system)
            role = message["role"]
            if role == "user":
                slots += _fill(self.user, system_text + message["content"])
            elif role == "assistant":
                slots += _fill(self.assistant_slots, message["content"])
            else:
                raise ValueError(f"role {role!r} is not supported by this template yet")
            encoded.append(_to_ids(tokenizer, slots))
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded) - 1, 2)]

    def encode_prompt(
        self, tokenizer: TokenizerLike, messages: list[dict[str, str]], system: str | None = None
    ) -> list[int]:
        """Ids of a conversation ending in a user message, ready for generation."""
        padded = list(messages) + [{"role": "assistant", "content": ""}]
        turns = self.encode_turns(tokenizer, padded, system)
        return [token for prompt, response in turns[:-1] for token in prompt + response] + turns[-1][0]


def _fill(slots: tuple[Slot, ...], content: str) -> list[Slot]:
    return [slot.replace("{{content}}", content) if type(slot) is str else slot for slot in slots]


def _render_text(slots: tuple[Slot, ...], content: str) -> str:
    return "".join(slot for slot in _fill(slots, content) if type(slot) is str)


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


_CHATML_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)

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
        Template(
            "chatml",
            user=_CHATML_USER,
            assistant=("{{content}}<|im_end|>\n",),
            system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
            stop_words=("<|im_end|>", "<|im_start|>"),
            replace_eos=True,
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


def prepare_tokenizer(tokenizer: Any, template: Template) -> list[str]:
    """Make eos/pad match the template (as LLaMA-Factory does). Returns tokens the vocabulary lacks."""
    missing = [w for w in template.stop_words if tokenizer.convert_tokens_to_ids(w) in (None, tokenizer.unk_token_id)]
    if missing:
        return missing
    if template.replace_eos and template.stop_words:
        tokenizer.eos_token = template.stop_words[0]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return []


def stop_token_ids(tokenizer: Any, template: Template) -> list[int]:
    ids = {tokenizer.eos_token_id}
    ids.update(tokenizer.convert_tokens_to_ids(word) for word in template.stop_words)
    return sorted(i for i in ids if i is not None)
