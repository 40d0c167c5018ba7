"""The one inference engine behind chat, the API, Serve replicas, predict and eval.

An engine turns a conversation (messages in the template's roles, a system prompt, a tool list) into replies, streams
one reply as text deltas, generates for a batch of prompt ids (predict), and scores texts when the model carries a
value head (a reward model trained by the rm stage). `infer_backend` picks the implementation: `huggingface` here,
`vllm` in `vllm_engine.py`, both behind the `Engine` protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from orchestrator.data.templates import Template, resolve_template, stop_token_ids
from orchestrator.data.tokenizer import TokenizerSpec, load_tokenizer, template_name
from orchestrator.data.tools import FunctionCall
from workers.generation import Sampling, generate_kwargs

from .source import ModelSource

__all__ = ["Conversation", "Engine", "EngineBase", "HuggingFaceEngine", "Reply", "Sampling"]

INFER_DTYPES = {"auto": "float32", "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]  # roles: user, assistant, observation, function; ends with user or observation
    system: str | None = None
    tools: str | None = None  # JSON list of function schemas


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "tool_calls"
    tool_calls: list[FunctionCall] = field(default_factory=list)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [text.index(word) for word in stop if word and word in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def finished_reply(template: Template, text: str, prompt_tokens: int, new_ids: list[int], budget: int,
                   stop_ids: list[int], sampling: Sampling, tools: str | None) -> Reply:  # fmt: skip
    """A generated text as a reply: cut at the first stop string, its tool calls parsed when tools were offered;
    it ended by itself unless it used the whole `budget` of new tokens without a stop."""
    text, stopped = cut_at_stop(text, sampling.stop)
    ended = stopped or (bool(new_ids) and new_ids[-1] in stop_ids) or len(new_ids) < budget
    reply = Reply(text, prompt_tokens, len(new_ids), "stop" if ended else "length")
    if tools:
        calls = template.extract_tool(text)
        if isinstance(calls, list) and calls:
            reply.tool_calls, reply.finish_reason = calls, "tool_calls"
    return reply


class Engine(Protocol):
    source: ModelSource
    template: Template
    tokenizer: Any
    can_score: bool

    def encode(self, conversation: Conversation) -> list[int]: ...

    def chat(self, conversation: Conversation, sampling: Sampling) -> list[Reply]: ...

    def stream(self, conversation: Conversation, sampling: Sampling, cancel: threading.Event | None = None
               ) -> Iterator[str]: ...  # fmt: skip

    def generate(self, prompts: list[list[int]], sampling: Sampling, tools: str | None = None) -> list[Reply]: ...

    def score(self, texts: list[str], max_length: int | None = None) -> list[float]: ...


class EngineBase:
    """What every backend shares: the tokenizer, the template with the config's overrides, the stop tokens."""

    def __init__(self, cfg: Any, source: ModelSource):
        self.cfg, self.source = cfg, source
        self.tokenizer = load_tokenizer(replace(TokenizerSpec.from_config(cfg), path=source.tokenizer))
        self.template = resolve_template(template_name(cfg), tool_format=cfg.tool_format,
                                         default_system=cfg.default_system,
                                         enable_thinking=cfg.enable_thinking)  # fmt: skip
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)

    def encode(self, conversation: Conversation) -> list[int]:
        return self.template.encode_prompt(self.tokenizer, conversation.messages, conversation.system,
                                           conversation.tools)  # fmt: skip

    def chat(self, conversation: Conversation, sampling: Sampling) -> list[Reply]:
        return self.generate([self.encode(conversation)], sampling, conversation.tools)


class HuggingFaceEngine(EngineBase):
    """transformers `generate` on the driver's (or a replica's, or a predict actor's) device."""

    def __init__(self, cfg: Any, source: ModelSource, stored_dtype: bool = False):
        """`stored_dtype`: with infer_dtype auto, keep the weights' own dtype (an export) instead of computing in
        float32."""
        import torch

        super().__init__(cfg, source)
        self.torch = torch
        self.stored_dtype = stored_dtype and cfg.infer_dtype == "auto"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self._load_model(cfg, source).eval()
        self.scorer = self._load_scorer(source)
        self.can_score = self.scorer is not None
        torch.manual_seed(cfg.seed)

    def _load_model(self, cfg: Any, source: ModelSource) -> Any:
        from transformers import AutoModelForCausalLM

        from orchestrator.environment import remote_code_imports
        from workers.model import ATTENTION, fit_embeddings, load_model_config

        remote_code_imports(cfg.trust_remote_code)
        bits, quantized = cfg.quantization_bit, {}
        if bits is not None:  # quantization_bit at inference: the base held k-bit (quantization_device_map: auto)
            from workers.quantization import from_pretrained_kwargs

            quantized = from_pretrained_kwargs(cfg, bits, self.device)
            if quantized.get("device_map") == "auto":
                quantized["offload_folder"] = cfg.offload_folder  # weights no device holds wait there
        model = AutoModelForCausalLM.from_pretrained(
            source.base, config=load_model_config(cfg, source.base),
            dtype="auto" if self.stored_dtype else getattr(self.torch, INFER_DTYPES[cfg.infer_dtype]),
            attn_implementation=ATTENTION[cfg.flash_attn], trust_remote_code=cfg.trust_remote_code,
            token=cfg.hf_hub_token, cache_dir=cfg.cache_dir, low_cpu_mem_usage=cfg.low_cpu_mem_usage, **quantized,
        )  # fmt: skip
        if bits is not None:
            from workers.quantization import quantize_after_load

            model = quantize_after_load(model, cfg, bits, self.device)
        fit_embeddings(model, self.tokenizer)  # an adapter trained with new tokens saved the grown embeddings
        if source.adapters:
            from peft import PeftModel

            for adapter in source.adapters:  # merged in order, so each one applies to the model the last produced
                model = PeftModel.from_pretrained(model, adapter)
                model = model if bits is not None else model.merge_and_unload()  # k-bit: attached, not re-quantized
        return model if quantized.get("device_map") else model.to(self.device)

    def _load_scorer(self, source: ModelSource) -> Any:
        if source.value_head is None:
            return None
        from workers.value_head import ValueHeadModel

        scorer = ValueHeadModel(self.model)
        scorer.load_head(source.value_head)
        return scorer.to(self.device).eval()

    def _kwargs(self, sampling: Sampling, prompt_len: int) -> dict[str, Any]:
        return generate_kwargs(sampling, prompt_len, self.stop_ids, self.tokenizer, self.cfg.use_cache)

    def _batch(self, prompts: list[list[int]]) -> tuple[Any, Any]:
        """Left-padded ids and attention mask: every row's answer starts at the same position."""
        from workers.collate import left_pad

        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    def generate(self, prompts: list[list[int]], sampling: Sampling, tools: str | None = None) -> list[Reply]:
        """`sampling.n` replies per prompt, prompt by prompt; one generate call for the whole batch."""
        from workers.collate import trim_response

        ids, mask = self._batch(prompts)
        longest = ids.shape[1]
        budget = sampling.new_tokens(longest)
        greedy = not sampling.do_sample and sampling.num_beams == 1  # n greedy answers are one answer n times
        per_prompt = 1 if greedy else sampling.n
        with self.torch.inference_mode():
            output = self.model.generate(ids, attention_mask=mask,
                                         **self._kwargs(replace(sampling, n=per_prompt), longest))  # fmt: skip
        replies = []
        for row, sequence in enumerate(output.tolist()):
            new = trim_response(sequence[longest:], set(self.stop_ids), self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(new, skip_special_tokens=sampling.skip_special_tokens)
            prompt = prompts[row // per_prompt]
            reply = finished_reply(self.template, text, len(prompt), new, budget, self.stop_ids, sampling, tools)
            replies += [replace(reply) for _ in range(sampling.n // per_prompt)]
        return replies

    def stream(self, conversation: Conversation, sampling: Sampling, cancel: threading.Event | None = None
               ) -> Iterator[str]:  # fmt: skip
        """Text deltas of one reply as they are generated; setting `cancel` (a client gone) ends the generation."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        cancel = cancel or threading.Event()
        prompt = self.encode(conversation)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=sampling.skip_special_tokens)  # fmt: skip
        ids, mask = self._batch([prompt])
        kwargs = {**self._kwargs(replace(sampling, n=1), len(prompt)), "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([until_set(cancel)])}  # fmt: skip

        def run() -> None:
            with self.torch.inference_mode():
                self.model.generate(ids, attention_mask=mask, **kwargs)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from held_back(streamer, sampling.stop, cancel)
        cancel.set()
        worker.join()

    def next_token_logits(self, prompts: list[list[int]]) -> Any:
        """The logits (float32, rows x vocabulary) of the token after each prompt, one forward pass for the batch.
        Left-padded rows get the positions they would have alone, so a row scores the same in any batch."""
        ids, mask = self._batch(prompts)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return logits[:, -1].float()

    def score(self, texts: list[str], max_length: int | None = None) -> list[float]:
        """The value head's score at each text's last token (LLaMA-Factory's /v1/score/evaluation)."""
        if self.scorer is None:
            raise ValueError("this model has no value head: train it with stage rm to score")
        from workers.value_head import last_token_index

        encoded = self.tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                                 add_special_tokens=False, return_tensors="pt").to(self.device)  # fmt: skip
        with self.torch.inference_mode():
            values = self.scorer(with_logits=False, input_ids=encoded["input_ids"],
                                 attention_mask=encoded["attention_mask"]).values  # fmt: skip
        last = last_token_index(encoded["attention_mask"])
        return values.gather(1, last[:, None]).squeeze(1).float().tolist()


def until_set(event: threading.Event) -> Any:
    """A stopping criterion that ends every row once `event` is set."""
    import torch
    from transformers import StoppingCriteria

    class UntilSet(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return UntilSet()


def held_back(chunks: Iterator[str], stop: tuple[str, ...], cancel: threading.Event) -> Iterator[str]:
    """Deltas with a stop string never shown: the last few characters wait until they cannot begin one."""
    keep = max((len(word) for word in stop), default=1) - 1
    pending = ""
    for chunk in chunks:
        pending += chunk
        text, stopped = cut_at_stop(pending, stop)
        if stopped:
            if text:
                yield text
            cancel.set()
            return
        ready = len(pending) - keep
        if ready > 0:
            yield pending[:ready]
            pending = pending[ready:]
    if pending:
        yield pending
