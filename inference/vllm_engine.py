"""`infer_backend: vllm`: the engine protocol on vLLM's asynchronous engine (continuous batching, paged attention).

vLLM runs on CUDA only: `backend_problems` stops a vllm config at the driver on a machine without CUDA or without
the vllm package, before any model loads. The engine runs vLLM's event loop on a thread of its own, so the
synchronous protocol (chat, stream, generate) serves the API, chat and predict alike.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

from orchestrator.errors import Problem
from orchestrator.values import as_dict, split_csv

from .engine import Conversation, EngineBase, Reply, Sampling, finished_reply, held_back
from .source import ModelSource

VLLM_DTYPES = {"auto": "auto", "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def backend_problems(cfg: Any) -> list[Problem]:
    """What stops `infer_backend: vllm` here, all together (empty for huggingface)."""
    if cfg.infer_backend != "vllm":
        return []
    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append(Problem("infer_backend", "vllm is not installed: `pip install vllm` on a machine with CUDA, "
                                                 "or use infer_backend: huggingface"))  # fmt: skip
    import torch

    if not torch.cuda.is_available():
        problems.append(Problem("infer_backend", "vllm needs a CUDA device and this machine has none; use "
                                                 "infer_backend: huggingface"))  # fmt: skip
    if cfg.num_beams > 1:
        problems.append(Problem("num_beams", f"given {cfg.num_beams}; the vllm backend samples or decodes greedily "
                                             "(num_beams: 1); use infer_backend: huggingface for beam search"))  # fmt: skip
    if len(split_csv(cfg.adapter_name_or_path)) > 1:
        problems.append(Problem("adapter_name_or_path", "vllm serves one adapter: merge the earlier ones into the "
                                                        "base with `loom export` first"))  # fmt: skip
    return problems


class VllmEngine(EngineBase):
    def __init__(self, cfg: Any, source: ModelSource):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        super().__init__(cfg, source)
        self._start_loop()
        args = AsyncEngineArgs(
            model=source.base, tokenizer=source.tokenizer, dtype=VLLM_DTYPES[cfg.infer_dtype],
            max_model_len=cfg.vllm_maxlen, gpu_memory_utilization=cfg.vllm_gpu_util,
            enforce_eager=cfg.vllm_enforce_eager, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed,
            enable_lora=bool(source.adapters), max_lora_rank=cfg.vllm_max_lora_rank, **as_dict(cfg.vllm_config),
        )  # fmt: skip
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self._lora = None
        if source.adapters:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("default", 1, source.adapters[-1])

    def _start_loop(self) -> None:
        self.can_score = False  # scoring reads the value head, which vLLM does not load: use huggingface
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="vllm-loop").start()

    def _params(self, sampling: Sampling, prompt_len: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            top_k=sampling.top_k if sampling.do_sample and sampling.top_k > 0 else -1,
            repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.new_tokens(prompt_len),
            stop=list(sampling.stop) or None, stop_token_ids=self.stop_ids,
            skip_special_tokens=sampling.skip_special_tokens,
        )  # fmt: skip

    def _outputs(self, ids: list[int], sampling: Sampling) -> Any:
        """vLLM's async generator of cumulative outputs for one prompt."""
        return self.engine.generate({"prompt_token_ids": ids}, self._params(sampling, len(ids)),
                                    f"loom-{next(self._ids)}", lora_request=self._lora)  # fmt: skip

    async def _final(self, ids: list[int], sampling: Sampling) -> Any:
        final = None
        async for output in self._outputs(ids, sampling):
            final = output
        return final

    def generate(self, prompts: list[list[int]], sampling: Sampling, tools: str | None = None) -> list[Reply]:
        futures = [asyncio.run_coroutine_threadsafe(self._final(ids, sampling), self._loop) for ids in prompts]
        replies = []
        for ids, future in zip(prompts, futures, strict=True):
            budget = sampling.new_tokens(len(ids))
            for choice in future.result().outputs:
                replies.append(finished_reply(self.template, choice.text, len(ids), list(choice.token_ids), budget,
                                              self.stop_ids, sampling, tools))  # fmt: skip
        return replies

    def stream(self, conversation: Conversation, sampling: Sampling, cancel: threading.Event | None = None
               ) -> Iterator[str]:  # fmt: skip
        cancel = cancel or threading.Event()
        deltas: queue.Queue[str | None] = queue.Queue()

        async def pump() -> None:
            shown = 0
            try:
                async for output in self._outputs(self.encode(conversation), sampling.updated(n=1)):
                    text = output.outputs[0].text
                    deltas.put(text[shown:])
                    shown = len(text)
                    if cancel.is_set():
                        break  # leaving the generator aborts the request in vLLM
            finally:
                deltas.put(None)

        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        yield from held_back(iter(deltas.get, None), sampling.stop, cancel)
        cancel.set()

    def score(self, texts: list[str], max_length: int | None = None) -> list[float]:
        raise ValueError("the vllm backend does not score: serve a reward model with infer_backend: huggingface")
