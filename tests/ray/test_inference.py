"""Using what was trained: the engine, `loom chat` through a terminal, and `loom api` through the real `openai` client,
all on the session's trained LoRA model (tests/conftest.py: trained_sft) and reward model (trained_reward_model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from inference.api import ApiSettings, build_app
from inference.commands import open_engine
from inference.engine import Conversation, EngineBase, Sampling, finished_reply
from orchestrator.config import validate_config
from tests.http_app import serving
from tests.terminal import Terminal

PROMPT = "Convert 3 hours to minutes."
KEY = "sk-loom-test"


def infer_config(raw: dict, **extra):
    return validate_config({**raw, **extra}, purpose="infer")


@pytest.fixture(scope="module")
def engine(trained_sft):
    return open_engine(infer_config(trained_sft.config), trained_sft.output_dir)


def ask(text: str = PROMPT) -> Conversation:
    return Conversation([{"role": "user", "content": text}])


def test_the_engine_answers_with_the_trained_adapter_and_streams_the_same_text(engine, trained_sft, tiny_model):
    greedy = Sampling.from_config(engine.cfg)
    reply = engine.chat(ask(), greedy)[0]
    assert reply.text and reply.completion_tokens > 0 and reply.finish_reason in ("stop", "length")
    assert "".join(engine.stream(ask(), greedy)) == reply.text  # streaming shows exactly the reply
    base = open_engine(infer_config(trained_sft.config, model_name_or_path=tiny_model), tiny_model)
    assert base.source.adapters == () and engine.source.adapters == (trained_sft.output_dir,)
    assert base.chat(ask(), greedy)[0].text != reply.text  # the adapter changed the answer
    first_word = reply.text.split()[0]
    cut = engine.chat(ask(), greedy.updated(stop=[first_word]))[0]
    assert first_word not in cut.text and cut.finish_reason == "stop"
    two = engine.generate([engine.encode(ask()), engine.encode(ask("What is Loom?"))], greedy.updated(n=2))
    assert [r.text for r in two[:2]] == [reply.text, reply.text]  # greedy: n copies; batched rows left-padded
    assert two[2].text == engine.chat(ask("What is Loom?"), greedy)[0].text
    capped = engine.chat(ask(), greedy.updated(max_length=len(engine.encode(ask())) + 2))[0]
    assert capped.completion_tokens <= 2 and capped.finish_reason in ("length", "stop")


def test_a_checkpoint_of_the_run_loads_as_well(trained_sft):
    checkpoint = os.path.join(trained_sft.run_dir, "checkpoint-000006")
    engine = open_engine(infer_config(trained_sft.config), checkpoint)
    assert engine.source.adapters == (os.path.join(checkpoint, "model"),)
    assert engine.chat(ask(), Sampling.from_config(engine.cfg))[0].completion_tokens > 0


def test_loom_chat_in_a_terminal_streams_keeps_history_clears_and_exits(trained_sft, engine, tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump(trained_sft.config))
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    terminal = Terminal([loom, "chat", str(config), "--system", "Answer briefly."], env=dict(os.environ))
    try:
        banner = terminal.read_until("User: ")
        assert trained_sft.output_dir in banner  # a training config chats with what it trained
        terminal.type(PROMPT)
        shown = terminal.read_until("\nUser: ")
        answer = shown.split("Assistant: ", 1)[1].split("\n", 1)[0]
        expected = engine.chat(Conversation([{"role": "user", "content": PROMPT}], "Answer briefly."),
                               Sampling.from_config(engine.cfg))[0].text  # fmt: skip
        assert answer == expected.strip("\n")
        terminal.type("And in seconds?")  # the second turn sees the first
        second = terminal.read_until("\nUser: ").split("Assistant: ", 1)[1].split("\n", 1)[0]
        history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer},
                   {"role": "user", "content": "And in seconds?"}]  # fmt: skip
        with_history = engine.chat(Conversation(history, "Answer briefly."), Sampling.from_config(engine.cfg))
        assert second == with_history[0].text.strip("\n")
        terminal.type("clear")
        assert "History cleared." in terminal.read_until("User: ")
        terminal.type("exit")
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()


def test_loom_chat_refuses_vllm_without_cuda_at_the_driver(trained_sft, tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({**trained_sft.config, "infer_backend": "vllm"}))
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    done = subprocess.run([loom, "chat", str(config)], capture_output=True, text=True, timeout=120, input="")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "infer_backend: vllm needs a CUDA device" in done.stderr or "vllm is not installed" in done.stderr


@pytest.fixture(scope="module")
def api(engine):
    settings = ApiSettings(key=KEY, model_name="loom-tiny", max_concurrent=2, queue=2)
    with serving(build_app(engine, settings, Sampling.from_config(engine.cfg))) as url:
        yield url


def client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_openai_client_chats_streams_and_samples_n_choices(api, engine):
    openai = client(api)
    assert [m.id for m in openai.models.list().data] == ["loom-tiny"]
    messages = [{"role": "user", "content": PROMPT}]
    reply = openai.chat.completions.create(model="loom-tiny", messages=messages, temperature=0)
    expected = engine.chat(ask(), Sampling.from_config(engine.cfg).updated(temperature=0))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == expected.completion_tokens
    stream = openai.chat.completions.create(model="loom-tiny", messages=messages, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    sampled = openai.chat.completions.create(model="loom-tiny", messages=messages, n=3, temperature=1.0,
                                             top_p=1.0, max_tokens=8)  # fmt: skip
    assert len(sampled.choices) == 3 and all(c.message.content is not None for c in sampled.choices)
    assert all(c.finish_reason in ("stop", "length") for c in sampled.choices)
    limited = openai.chat.completions.create(model="loom-tiny", messages=messages, temperature=0, max_tokens=2)
    assert limited.usage.completion_tokens <= 2


def test_the_api_refuses_without_the_key_and_answers_bad_requests_in_openais_shape(api):
    import openai as sdk

    with pytest.raises(sdk.AuthenticationError) as caught:
        client(api, key="wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(sdk.BadRequestError) as caught:
        client(api).chat.completions.create(model="m", messages=[{"role": "assistant", "content": "hi"}])
    assert caught.value.body["param"] == "messages.0.role"
    with pytest.raises(sdk.BadRequestError) as caught:
        client(api).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=9)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(sdk.BadRequestError, match="one choice"):
        client(api).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2,
                                            stream=True).close()  # fmt: skip
    import requests

    raw = requests.post(f"{api}/v1/chat/completions", data=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and "error" in raw.json()
    assert requests.get(f"{api}/v1/nowhere").json()["error"]["message"] == "Not Found"


def test_fifty_clients_at_once_each_succeed_or_get_429_and_the_server_stays_up(api):
    import requests

    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0}

    def one(_: int) -> tuple[int, str | None]:
        answer = requests.post(f"{api}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                            timeout=120)  # fmt: skip
        return answer.status_code, answer.headers.get("retry-after")

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 4 and codes.count(429) >= 1, codes
    assert all(int(retry) >= 1 for code, retry in results if code == 429)
    assert client(api).models.list().data  # still up


class ToolCallingEngine(EngineBase):
    """The tiny model never emits a tool call: this engine answers with the text a tool-calling model would write in
    the template's format; the parsing into tool_calls and the API's answer are Loom's real ones."""

    can_score = False
    TEXT = 'Action: add\nAction Input: {"a": 1, "b": 2}'

    def generate(self, prompts, sampling, tools=None):
        return [finished_reply(self.template, self.TEXT, len(p), [1, 2], 16, [], sampling, tools) for p in prompts]


def test_tool_calls_are_parsed_into_openai_tool_calls(engine):
    canned = ToolCallingEngine(engine.cfg, engine.source)
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
              "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]  # fmt: skip
    assert "add" in canned.tokenizer.decode(canned.encode(Conversation([{"role": "user", "content": "1+2?"}],
                                                                        tools=json.dumps([tools[0]["function"]]))))  # fmt: skip
    with serving(build_app(canned, ApiSettings(), Sampling.from_config(engine.cfg))) as url:
        openai = client(url)
        reply = openai.chat.completions.create(model="m", messages=[{"role": "user", "content": "1+2?"}], tools=tools)
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}
        streamed = list(openai.chat.completions.create(model="m", messages=[{"role": "user", "content": "1+2?"}],
                                                       tools=tools, stream=True))  # fmt: skip
        calls = [tc for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].function.name == "add" and streamed[-1].choices[0].finish_reason == "tool_calls"


def test_a_reward_model_scores_through_the_api_for_ppo(trained_reward_model):
    from workers.rewards import ApiReward

    engine = open_engine(infer_config(trained_reward_model.config), trained_reward_model.output_dir)
    assert engine.can_score
    prompt = "Human: Add 12 and 30.\nAssistant:"
    texts = [f"{prompt}12 + 30 = 42. Thanks.", f"{prompt}12 + 30 = 42. Whatever."]
    with serving(build_app(engine, ApiSettings(), Sampling.from_config(engine.cfg))) as url:
        cfg = validate_config({"model_name_or_path": trained_reward_model.config["model_name_or_path"], "stage": "ppo",
                               "reward_model": f"{url}/v1/score/evaluation", "reward_model_type": "api"},
                              purpose="infer")  # fmt: skip
        chosen, rejected = ApiReward(cfg)._post(texts)  # what Loom's ppo stage sends and reads
        assert chosen > rejected
        assert [round(s, 4) for s in engine.score(texts)] == [round(chosen, 4), round(rejected, 4)]


def test_scoring_a_model_without_a_value_head_is_a_400(api):
    import requests

    answer = requests.post(f"{api}/v1/score/evaluation", json={"model": "m", "messages": ["a"]},
                        headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert answer.status_code == 400 and "not a reward model" in answer.json()["error"]["message"]


def test_a_streaming_client_that_leaves_frees_its_place(api):
    """A client that reads one chunk and goes away: the generation stops and its place is free for the next."""
    import requests

    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": 512}
    for _ in range(5):  # more than running + waiting places: a leaked place would turn the later ones away
        with requests.post(f"{api}/v1/chat/completions", json=body, headers=headers, timeout=60, stream=True) as answer:
            assert answer.status_code == 200
            next(answer.iter_lines())
    done = threading.Event()
    status = []

    def later() -> None:
        status.append(requests.post(f"{api}/v1/chat/completions", headers=headers, timeout=60,
                                 json={**body, "stream": False, "max_tokens": 4}).status_code)  # fmt: skip
        done.set()

    threading.Thread(target=later, daemon=True).start()
    assert done.wait(60) and status == [200]


def test_export_merges_shards_and_reloads_in_plain_transformers_with_the_same_greedy_text(
    engine, trained_sft, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "exported"
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump({**trained_sft.config, "export_dir": str(target), "export_size": 0.0005}))
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    done = subprocess.run([loom, "export", str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = set(os.listdir(target))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names  # 0.0005 GB shards of a ~2 MB model
    assert {"tokenizer.json", "config.json", "Modelfile"} <= names and "adapter_config.json" not in names
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    modelfile = (target / "Modelfile").read_text()
    assert modelfile.startswith("FROM .") and "Human: {{ .Content }}" in modelfile  # the default template's turns

    model = AutoModelForCausalLM.from_pretrained(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt = engine.encode(ask())
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=16, eos_token_id=engine.stop_ids,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    plain = tokenizer.decode(trim(out[0, len(prompt) :].tolist(), engine), skip_special_tokens=True)
    assert plain == engine.chat(ask(), Sampling.from_config(engine.cfg))[0].text

    again = subprocess.run([loom, "export", str(config)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def trim(ids: list[int], engine) -> list[int]:
    from workers.collate import trim_response

    return trim_response(ids, set(engine.stop_ids), engine.tokenizer.pad_token_id)


def test_export_of_a_reward_model_keeps_its_value_head_in_legacy_format(trained_reward_model, tmp_path):
    from inference.commands import export

    cfg = infer_config(trained_reward_model.config, export_dir=str(tmp_path / "rm"), export_legacy_format=True)
    _, folder = export(cfg, trained_reward_model.output_dir)
    names = set(os.listdir(folder))
    assert "value_head.safetensors" in names and any(n.endswith(".bin") for n in names)
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)
    exported = open_engine(infer_config(trained_reward_model.config), folder)
    original = open_engine(infer_config(trained_reward_model.config), trained_reward_model.output_dir)
    texts = ["Human: Add 1 and 2.\nAssistant:1 + 2 = 3. Thanks."]
    assert exported.source.adapters == () and exported.score(texts) == pytest.approx(original.score(texts), abs=1e-5)


def test_export_refuses_what_it_cannot_do_here_all_at_once(trained_sft, tmp_path, monkeypatch):
    from inference.commands import export
    from orchestrator.errors import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cfg = infer_config(trained_sft.config, export_dir=str(taken), export_quantization_bit=4,
                       export_hub_model_id="me/tiny")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        export(cfg)
    assert {"export_dir", "export_quantization_bit", "export_quantization_dataset", "export_hub_model_id"} <= set(
        caught.value.keys
    )
    assert (taken / "notes.txt").read_text() == "mine" and os.listdir(taken) == ["notes.txt"]


def test_loom_predict_on_two_workers_writes_predictions_and_scores(ray_cluster, trained_sft, engine, tmp_path):
    from inference.metrics import similarity

    out = tmp_path / "predict"
    config = tmp_path / "predict.yaml"
    config.write_text(yaml.safe_dump({**trained_sft.config, "eval_dataset": "loom_demo_sft", "max_samples": 12,
                                      "per_device_eval_batch_size": 4, "output_dir": str(out)}))  # fmt: skip
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    done = subprocess.run([loom, "predict", str(config), "--model-dir", trained_sft.output_dir],
                          capture_output=True, text=True, timeout=600, env=ray_cluster.env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    results = json.loads((out / "predict_results.json").read_text())
    assert len(rows) == 12 == results["predict_samples"] and results["predict_workers"] == 2
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "orchestrator", "demo", "data",
                           "loom_demo_sft.json")) as handle:  # fmt: skip
        first = json.load(handle)[0]
    assert rows[0]["label"].strip() == first["output"] and first["instruction"] in rows[0]["prompt"]  # file order
    expected = engine.chat(ask(first["instruction"]), Sampling.from_config(engine.cfg))[0].text
    assert rows[0]["predict"] == expected  # the trained adapter's greedy answer, batched on an actor
    scores = similarity([r["predict"] for r in rows], [r["label"] for r in rows])
    assert {k: results[k] for k in scores} == scores and 0 < results["predict_rouge-1"] < 100
    assert results["predict_samples_per_second"] > 0


def test_loom_serve_runs_two_replicas_on_the_cluster_behind_serves_proxy(ray_cluster, trained_sft, engine, tmp_path):
    import requests
    from ray.util.state import list_actors

    from inference.serve import running_replicas
    from tests.conftest import free_port

    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(trained_sft.config))
    env = {**ray_cluster.env(), "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_KEY": KEY,
           "API_MODEL_NAME": "loom-tiny", "MAX_CONCURRENT": "2"}  # fmt: skip
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    server = subprocess.Popen([loom, "serve", str(config), "--replicas", "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        banner = server.stdout.readline()
        assert banner.startswith("loom serve: 2 replica(s) on http://127.0.0.1:"), server.stderr.read()[-3000:]
        assert running_replicas() == 2
        openai = client(f"http://127.0.0.1:{port}")
        messages = [{"role": "user", "content": PROMPT}]
        expected = engine.chat(ask(), Sampling.from_config(engine.cfg).updated(temperature=0))[0].text
        assert openai.chat.completions.create(model="loom-tiny", messages=messages,
                                              temperature=0).choices[0].message.content == expected  # fmt: skip
        stream = openai.chat.completions.create(model="loom-tiny", messages=messages, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected  # streamed through Serve

        def answered_by(_: int) -> str:
            raw = openai.chat.completions.with_raw_response.create(model="loom-tiny", messages=messages,
                                                                   temperature=0, max_tokens=4)  # fmt: skip
            return raw.headers["x-loom-replica"]

        with ThreadPoolExecutor(8) as pool:
            replicas = set(pool.map(answered_by, range(16)))
        assert len(replicas) == 2  # the router spread the load over both replicas
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401  # same app, same key
    finally:
        server.send_signal(2)  # Ctrl-C: the app is taken down
        server.wait(timeout=120)
    assert server.returncode == 0
    alive = list_actors(filters=[("state", "=", "ALIVE")])
    assert not [a for a in alive if a.class_name.startswith(("ServeReplica", "ServeController", "ProxyActor"))]
    with pytest.raises(requests.ConnectionError):  # the proxy went with the last app
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)


def test_loom_serve_refuses_replicas_the_cluster_cannot_place(ray_cluster, trained_sft, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({**trained_sft.config, "resources_per_worker": {"CPU": 3}}))
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    done = subprocess.run([loom, "serve", str(config), "--replicas", "2"], capture_output=True, text=True,
                          timeout=300, env=ray_cluster.env())  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "resources_per_worker" in done.stderr and "needs 6 CPU, cluster has 4 CPU" in done.stderr


DEMO_TASKS = os.path.join(os.path.dirname(__file__), "..", "..", "orchestrator", "demo", "evaluation")


def test_loom_eval_scores_the_demo_benchmark_on_two_workers_by_the_answer_letters_logits(
    ray_cluster, trained_sft, engine, tmp_path
):  # fmt: skip
    from inference.benchmarks import CHOICES, load_subjects
    from inference.evaluate import eval_rows

    results = tmp_path / "scores"
    raw = {**trained_sft.config, "task": "mmlu_test", "task_dir": DEMO_TASKS, "n_shot": 2, "batch_size": 3,
           "save_dir": str(results), "seed": 3}  # fmt: skip
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(raw))
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    done = subprocess.run([loom, "eval", str(config), "--model-dir", trained_sft.output_dir], capture_output=True,
                          text=True, timeout=600, env=ray_cluster.env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 questions on 2 worker(s)" in done.stdout and "Average:" in done.stdout
    assert sorted(os.listdir(results)) == ["results.json", "results.log", "scores.json"]
    predicted = json.loads((results / "results.json").read_text())
    scores = json.loads((results / "scores.json").read_text())
    # The same prompts scored here, one by one: the letter whose logit is highest after the prompt.
    subjects, _ = load_subjects(os.path.join(DEMO_TASKS, "mmlu"), "mmlu", "test")
    letters = [engine.tokenizer.encode(c, add_special_tokens=False)[-1] for c in CHOICES]
    rows = eval_rows(infer_config(raw), subjects)
    prompts = [engine.encode(Conversation(json.loads(r["messages"]))) for r in rows]
    alone = [CHOICES[int(engine.next_token_logits([p])[0, letters].argmax())] for p in prompts]
    assert [predicted[r["subject"]][str(r["index"])] for r in rows] == alone
    batched = engine.next_token_logits(prompts[:3])  # left-padded rows score as they do alone
    assert all((batched[i] - engine.next_token_logits([p])[0]).abs().max() < 1e-4 for i, p in enumerate(prompts[:3]))
    right = sum(a == r["answer"] for a, r in zip(alone, rows, strict=True))
    assert scores["categories"]["Average"] == {"accuracy": round(100 * right / 12, 2), "questions": 12}
    assert set(scores["categories"]) == {"Average", "STEM", "Social Sciences", "Humanities"}
    assert (results / "results.log").read_text().splitlines()[0].strip().startswith("Average:")
    again = subprocess.run([loom, "eval", str(config), "--model-dir", trained_sft.output_dir], capture_output=True,
                           text=True, timeout=300, env=ray_cluster.env())  # fmt: skip
    assert again.returncode != 0 and "save_dir" in again.stderr and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_do_predict_after_loom_train_writes_the_predictions_of_what_it_trained(ray_cluster, tiny_model, tmp_path):
    from tests.conftest import _small_run
    from tests.helpers import DEMO_DATA

    raw = _small_run(tiny_model, tmp_path, dataset="loom_demo_sft", max_samples=8, max_steps=2, save_steps=2,
                     do_predict=True, predict_with_generate=True, eval_dataset="loom_demo_sft",
                     per_device_eval_batch_size=4, do_sample=False, max_new_tokens=8)  # fmt: skip
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw))
    loom = os.path.join(os.path.dirname(sys.executable), "loom")
    done = subprocess.run([loom, "train", str(config)], capture_output=True, text=True, timeout=600,
                          env=ray_cluster.env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    results = json.loads((out / "predict_results.json").read_text())
    assert len(rows) == 8 == results["predict_samples"] and "predict_bleu-4" in results
    trained = open_engine(infer_config(raw), str(out))  # the adapter this run just wrote
    assert trained.source.adapters == (str(out),)
    first = json.loads((DEMO_DATA / "loom_demo_sft.json").read_text())[0]
    assert rows[0]["predict"] == trained.chat(ask(first["instruction"]), Sampling.from_config(trained.cfg))[0].text


def test_batch_commands_on_a_cluster_whose_cpus_another_job_holds_stop_after_the_wait(ray_cluster, trained_sft,
                                                                                       tmp_path):  # fmt: skip
    """predict and eval map over model actors: without the check they would wait for CPUs without end."""
    from inference.commands import run_eval, run_predict
    from orchestrator.errors import PlanError
    from tests.helpers import cpus_held

    raw = {**trained_sft.config, "ray_placement_wait_s": 2, "eval_dataset": "loom_demo_sft",
           "output_dir": str(tmp_path / "predict"), "task": "mmlu_test", "task_dir": DEMO_TASKS,
           "save_dir": str(tmp_path / "scores")}  # fmt: skip
    with cpus_held(4):
        for command in (run_predict, run_eval):
            with pytest.raises(PlanError, match=r"could not be reserved within 2 s \(ray_placement_wait_s\)"):
                command(infer_config(raw), trained_sft.output_dir)
    assert not os.path.exists(tmp_path / "predict") and not os.path.exists(tmp_path / "scores")
