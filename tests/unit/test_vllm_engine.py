"""The vllm backend up to the GPU boundary: vLLM's engine itself (CUDA only) is replaced by the stream of cumulative
outputs it yields, and everything Loom does with them runs for real (replies, stop strings, lengths, streaming
deltas, cancellation). The real engine runs in tests/gpu/test_inference_gpu.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from inference.engine import Conversation, EngineBase, Sampling
from inference.source import model_source
from inference.vllm_engine import VllmEngine
from orchestrator.config import validate_config


class ScriptedVllm(VllmEngine):
    """VllmEngine whose vLLM engine is a script: per request, the cumulative (text, token ids) it would yield."""

    def __init__(self, cfg, source, script):
        EngineBase.__init__(self, cfg, source)
        self._start_loop()
        self._lora, self.script, self.seen = None, script, []

    def _outputs(self, ids, sampling):
        self.seen.append((ids, sampling))

        async def outputs():
            for text, tokens in self.script:
                yield SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=tokens)] * sampling.n)

        return outputs()


def engine(tiny_model, script):
    cfg = validate_config({"model_name_or_path": tiny_model, "template": "default"}, purpose="infer")
    return ScriptedVllm(cfg, model_source(cfg, None), script)


def test_replies_are_cut_at_stop_strings_and_end_by_length_when_the_budget_is_spent(tiny_model):
    script = [("Hel", [5]), ("Hello wor", [5, 6]), ("Hello world###more", [5, 6, 7, 8])]
    vllm = engine(tiny_model, script)
    talk = Conversation([{"role": "user", "content": "hi"}])
    stopped = vllm.chat(talk, Sampling(max_new_tokens=16, stop=("###",), n=2))
    assert [r.text for r in stopped] == ["Hello world", "Hello world"] and stopped[0].finish_reason == "stop"
    assert stopped[0].completion_tokens == 4 and stopped[0].prompt_tokens == len(vllm.encode(talk))
    spent = vllm.chat(talk, Sampling(max_new_tokens=4))[0]
    assert spent.finish_reason == "length" and spent.text == "Hello world###more"
    assert vllm.seen[0][0] == vllm.encode(talk)  # the template's prompt ids go to vLLM


def test_streamed_deltas_add_up_to_the_reply_and_never_show_a_stop_string(tiny_model):
    vllm = engine(tiny_model, [("Hel", [5]), ("Hello wor", [5, 6]), ("Hello world###more", [5, 6, 7, 8])])
    talk = Conversation([{"role": "user", "content": "hi"}])
    deltas = list(vllm.stream(talk, Sampling(stop=("###",))))
    assert "".join(deltas) == "Hello world" and len(deltas) > 1
    cancel = threading.Event()
    cancel.set()  # a client already gone: the first output ends the request
    assert "###" not in "".join(vllm.stream(talk, Sampling(stop=("###",)), cancel))
