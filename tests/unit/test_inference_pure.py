"""The inference layer's pure rules: sampling overrides, stop strings, OpenAI request translation, admission,
API settings from the environment, and which folder a command loads. No model, no server."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from inference.admission import Admission, Busy
from inference.api import ApiSettings
from inference.engine import Reply, Sampling, cut_at_stop, held_back
from inference.openai_schema import ApiError, ChatRequest, completion, conversation, tools_json
from inference.source import model_source
from orchestrator.config import validate_config
from orchestrator.data.tools import FunctionCall
from orchestrator.errors import ConfigError


def test_sampling_overrides_keep_unset_values_and_temperature_zero_is_greedy():
    base = Sampling(do_sample=True, temperature=0.9, max_new_tokens=64)
    assert base.updated(temperature=None, max_new_tokens=8) == Sampling(do_sample=True, temperature=0.9,
                                                                        max_new_tokens=8)  # fmt: skip
    greedy = base.updated(temperature=0)
    assert greedy.do_sample is False and greedy.temperature == 0.9
    assert base.updated(stop="###").stop == ("###",) and base.updated(stop=["a", "b"]).stop == ("a", "b")
    assert Sampling(max_new_tokens=100, max_length=30).new_tokens(prompt_len=25) == 5  # max_length is tighter
    assert Sampling(max_new_tokens=100, max_length=30).new_tokens(prompt_len=40) == 1


def test_stop_strings_cut_the_reply_and_are_never_streamed():
    assert cut_at_stop("one two###three", ("###", "two")) == ("one ", True)
    assert cut_at_stop("no stop here", ("###",)) == ("no stop here", False)
    cancel = threading.Event()
    deltas = list(held_back(iter(["Hel", "lo #", "## rest"]), ("###",), cancel))
    assert "".join(deltas) == "Hello " and cancel.is_set()  # the stop string split over chunks is held back
    assert "".join(held_back(iter(["a", "b", "c"]), (), threading.Event())) == "abc"


def request(**fields) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", **fields})


def test_openai_messages_become_the_templates_roles():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    talk = conversation(request(tools=tools, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "1."}]},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "1"},
    ]))  # fmt: skip
    assert talk.system == "Be brief."
    assert [m["role"] for m in talk.messages] == ["user", "function", "observation"]
    assert talk.messages[0]["content"] == "Add 1."
    assert json.loads(talk.messages[1]["content"]) == [{"name": "add", "arguments": {"a": 1}}]
    assert json.loads(talk.tools) == [tools[0]["function"]]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "assistant", "content": "hi"}], "messages.0.role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages.1.role"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages.1.role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages.0.content"),
    ],
)
def test_a_conversation_the_template_cannot_take_is_a_400_naming_the_field(messages, param):
    with pytest.raises(ApiError) as caught:
        conversation(request(messages=messages))
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_tools_must_be_functions():
    with pytest.raises(ApiError, match="each tool"):
        tools_json([{"type": "retrieval"}])
    assert tools_json([]) is None


def test_a_completion_carries_tool_calls_usage_and_finish_reasons():
    replies = [Reply("", 7, 5, "tool_calls", [FunctionCall("add", '{"a": 1}')]), Reply("3", 7, 2, "length")]
    body = completion("tiny", replies)
    first, second = body["choices"]
    assert first["message"]["content"] is None and first["finish_reason"] == "tool_calls"
    assert first["message"]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert second["message"] == {"role": "assistant", "content": "3"} and second["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}


def test_admission_runs_max_concurrent_queues_the_rest_and_turns_away_past_the_queue():
    async def scenario() -> tuple[int, ...]:
        admission = Admission(running=2, waiting=1)
        release = asyncio.Event()
        peak = 0

        async def one() -> str:
            nonlocal peak
            try:
                ticket = admission.admit()
            except Busy as busy:
                assert busy.retry_after >= 1
                return "busy"
            async with ticket:
                peak = max(peak, admission.running - admission._turns._value)
                await release.wait()
            return "done"

        tasks = [asyncio.ensure_future(one()) for _ in range(5)]
        await asyncio.sleep(0.05)
        inside = admission.inside
        release.set()
        results = await asyncio.gather(*tasks)
        return inside, results.count("done"), results.count("busy"), peak, admission.inside

    inside, done, busy, peak, left = asyncio.run(scenario())
    assert (inside, done, busy, peak, left) == (3, 3, 2, 2, 0)


def test_api_settings_from_llamafactorys_environment_variables():
    env = {"API_HOST": "127.0.0.1", "API_PORT": "8123", "API_KEY": "k", "API_MODEL_NAME": "mine", "API_VERBOSE": "0",
           "FASTAPI_ROOT_PATH": "/proxy", "MAX_CONCURRENT": "3", "LOOM_API_QUEUE": "5"}  # fmt: skip
    assert ApiSettings.from_env(env) == ApiSettings("127.0.0.1", 8123, "k", "mine", False, "/proxy", 3, 5)
    assert ApiSettings.from_env({}) == ApiSettings()
    with pytest.raises(ConfigError) as caught:
        ApiSettings.from_env({"API_PORT": "eighty", "MAX_CONCURRENT": "0", "API_VERBOSE": "loud"})
    assert set(caught.value.keys) == {"API_PORT", "MAX_CONCURRENT", "API_VERBOSE"}


def test_the_model_a_command_loads_from_each_kind_of_folder(tmp_path):
    base, adapter, run = tmp_path / "base", tmp_path / "adapter", tmp_path / "run" / "checkpoint-000006"
    for folder in (base, adapter, run / "model"):
        folder.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "value_head.safetensors").write_text("")
    (adapter / "tokenizer_config.json").write_text("{}")
    (run / "loom_checkpoint.json").write_text("{}")
    (run / "model" / "adapter_config.json").write_text("{}")
    cfg = validate_config({"model_name_or_path": str(base)}, purpose="infer")
    assert model_source(cfg).adapters == () and model_source(cfg).base == str(base)
    from_adapter = model_source(cfg, str(adapter))
    assert from_adapter.adapters == (str(adapter),) and from_adapter.value_head == str(adapter)
    assert from_adapter.tokenizer == str(adapter)  # it saved its own (maybe grown) tokenizer
    from_checkpoint = model_source(cfg, str(run))
    assert from_checkpoint.adapters == (str(run / "model"),) and from_checkpoint.tokenizer == str(base)
    assert model_source(cfg, str(base)).base == str(base)
    with pytest.raises(ConfigError, match="holds no model"):
        model_source(cfg, str(tmp_path))


def test_similarity_scores_match_hand_computed_values():
    from inference.metrics import row_scores, similarity

    same = row_scores("the cat sat", "the cat sat")
    assert same == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    # words: 2 of 3 unigrams shared (P = R = F = 2/3), 1 of 2 bigrams (F = 1/2), longest common run 2 (F = 2/3)
    words = row_scores("the cat sat", "the cat ran")
    assert (words["rouge-1"], words["rouge-2"], words["rouge-l"]) == (66.6667, 50.0, 66.6667)
    # characters "abce" against "abcd": 1-4-gram precisions 3/4, 2/3, 1/2 and 0 -> 1/2 (smoothing method 3),
    # brevity penalty 1: (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.125 ** 0.25 = 0.594604
    assert row_scores("abce", "abcd")["bleu-4"] == 59.4604
    assert row_scores("", "abc")["rouge-1"] == 0.0  # an empty side scores 0, as LLaMA-Factory counts it
    chinese = row_scores("我爱北京", "我爱北京天安门")  # jieba: 我 / 爱 / 北京 against 我 / 爱 / 北京 / 天安门
    assert chinese["rouge-1"] == round(2 * (1.0 * 0.75) / 1.75 * 100, 4)
    assert similarity(["the cat sat", "abce"], ["the cat sat", "abcd"])["predict_bleu-4"] == round(
        (100.0 + 59.4604) / 2, 4
    )


def test_serve_replica_counts_and_autoscaling_bounds(model_dir):
    from inference.serve import ReplicaScale

    cfg = validate_config({"model_name_or_path": model_dir, "ray_num_workers": 3}, purpose="infer")
    fixed = ReplicaScale.resolve(cfg, None, None, None)
    assert fixed == ReplicaScale(3, 3, 3) and not fixed.autoscaling
    settings = ApiSettings(max_concurrent=2, queue=4)
    assert fixed.deployment_options(settings) == {"max_ongoing_requests": 7, "num_replicas": 3}
    elastic = validate_config(
        {"model_name_or_path": model_dir, "ray_num_workers": 3, "ray_min_workers": 1}, purpose="infer"
    )
    assert ReplicaScale.resolve(elastic, None, None, None) == ReplicaScale(3, 1, 3)  # like an elastic run
    scaled = ReplicaScale.resolve(cfg, 2, 1, 4)
    assert scaled.deployment_options(settings)["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 2}  # fmt: skip
    assert "num_replicas" not in scaled.deployment_options(settings)
    with pytest.raises(ConfigError) as refused:
        ReplicaScale.resolve(cfg, 5, 1, 4)
    assert "--replicas: given 5; between --min-replicas (1) and --max-replicas (4)" in str(refused.value)
    with pytest.raises(ConfigError, match="--min-replicas: given 0"):
        ReplicaScale.resolve(cfg, 2, 0, 4)


@pytest.mark.parametrize("thinking", [True, False])
def test_enable_thinking_reaches_the_engines_prompt_and_the_data_layer(tiny_model, thinking):
    from inference.engine import Conversation, EngineBase
    from orchestrator.data.pipeline import TokenizeJob

    cfg = validate_config({"model_name_or_path": tiny_model, "template": "qwen3", "enable_thinking": thinking,
                           "dataset": "loom_demo_sft"}, purpose="data")  # fmt: skip
    engine = EngineBase(cfg, model_source(cfg, None))
    prompt = engine.tokenizer.decode(engine.encode(Conversation([{"role": "user", "content": "hi"}])))
    assert prompt.endswith("<think>\n\n</think>\n\n") is (not thinking)  # off: answer at once, no thinking
    assert TokenizeJob.from_config(cfg).enable_thinking is thinking
