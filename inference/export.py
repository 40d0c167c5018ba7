"""`loom export`: the trained model as one plain folder any transformers user (or Ollama) loads.

Adapters are merged into the base in order; a reward model's value head is copied beside the weights; the
tokenizer is saved; shards are at most `export_size` GB (`.bin` with `export_legacy_format`); a `Modelfile` carries
the template for Ollama. The folder is written under a temporary name and renamed when complete, so `export_dir`
is either the whole export or absent. GPTQ quantization (`export_quantization_bit`) and the hub push
(`export_hub_model_id`) are checked at the driver: they need gptqmodel + optimum on CUDA, and the hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

from orchestrator.data.templates import BOS, EOS, Template, Token
from orchestrator.errors import Problem

from .source import VALUE_HEAD_FILE, ModelSource

GPTQ_PACKAGES = ("gptqmodel", "optimum")


def export_problems(cfg: Any) -> list[Problem]:
    """Everything that stops this export, together, before any weight loads."""
    problems = []
    if not cfg.export_dir:
        problems.append(Problem("export_dir", "is required: the folder the exported model is written to"))
    elif os.path.exists(cfg.export_dir) and os.listdir(cfg.export_dir):
        problems.append(Problem("export_dir", f"{cfg.export_dir!r} exists and is not empty; name a new folder"))
    if cfg.export_quantization_bit is not None:
        missing = [name for name in GPTQ_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            problems.append(Problem("export_quantization_bit", f"GPTQ export needs {' and '.join(missing)} "
                                                               "(pip install gptqmodel optimum, on a CUDA machine)"))  # fmt: skip
        import torch

        if not torch.cuda.is_available():
            problems.append(Problem("export_quantization_bit", "GPTQ calibration needs a CUDA device; this machine "
                                                               "has none"))  # fmt: skip
        if not cfg.export_quantization_dataset or not os.path.isfile(cfg.export_quantization_dataset):
            problems.append(Problem("export_quantization_dataset", f"given {cfg.export_quantization_dataset!r}; a "
                                                                   "JSON file of the texts GPTQ calibrates on is "
                                                                   "required with export_quantization_bit"))  # fmt: skip
    if cfg.export_hub_model_id and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        problems.append(Problem("export_hub_model_id", f"given {cfg.export_hub_model_id!r}; pushing needs the hub "
                                                       "and HF_HUB_OFFLINE is set"))  # fmt: skip
    return problems


def _slot_text(slot: Any, tokenizer: Any, content: str) -> str:
    if isinstance(slot, Token):
        return slot.name
    if slot is BOS:
        return tokenizer.bos_token or ""
    if slot is EOS:
        return tokenizer.eos_token or ""
    return str(slot).replace("{{content}}", content).replace("{{idx}}", "")


def ollama_modelfile(template: Template, tokenizer: Any, system: str | None) -> str:
    """An Ollama Modelfile whose Go template writes the conversation as the template does."""

    def slots(which: tuple, content: str) -> str:
        return "".join(_slot_text(slot, tokenizer, content) for slot in which)

    go = (
        slots(template.prefix, "")
        + "{{ if .System }}" + slots(template.system, "{{ .System }}") + "{{ end }}"
        + "{{ range .Messages }}{{ if eq .Role \"user\" }}" + slots(template.user, "{{ .Content }}")
        + "{{ else if eq .Role \"assistant\" }}" + slots(template.assistant_slots, "{{ .Content }}")
        + "{{ end }}{{ end }}"
    )  # fmt: skip
    lines = ["FROM .", f'TEMPLATE """{go}"""']
    if system or template.default_system:
        lines.append(f'SYSTEM """{system or template.default_system}"""')
    stops = [tokenizer.eos_token, *template.stop_words]
    lines += [f'PARAMETER stop "{word}"' for word in dict.fromkeys(stops) if word]
    lines.append("PARAMETER num_ctx 4096")
    return "\n".join(lines) + "\n"


def calibration_texts(cfg: Any, tokenizer: Any) -> list[str]:
    """`export_quantization_nsamples` windows of `export_quantization_maxlen` tokens from the calibration file (JSON
    or JSON lines: each record's `text`, else its string fields joined), drawn with the config's seed."""
    import json
    import random

    path = cfg.export_quantization_dataset
    with open(path, encoding="utf-8") as handle:
        raw = handle.read()
    try:
        records = json.loads(raw)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    texts = [r["text"] if "text" in r else " ".join(v for v in r.values() if isinstance(v, str)) for r in records]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts if t]
    chooser, size = random.Random(cfg.seed), cfg.export_quantization_maxlen
    windows = []
    for _ in range(cfg.export_quantization_nsamples):
        row = chooser.choice(ids)
        start = chooser.randrange(max(1, len(row) - size + 1))
        windows.append(tokenizer.decode(row[start : start + size]))
    return windows


def quantize_gptq(cfg: Any, folder: str, tokenizer: Any, shard: str) -> Any:
    """The merged folder quantized in place with GPTQ (transformers' GPTQConfig over gptqmodel/optimum, on CUDA)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    config = GPTQConfig(bits=cfg.export_quantization_bit, dataset=calibration_texts(cfg, tokenizer),
                        tokenizer=tokenizer)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="auto",
                                                 dtype="auto")  # fmt: skip
    for name in os.listdir(folder):
        if name.endswith((".safetensors", ".bin", ".index.json")):
            os.remove(os.path.join(folder, name))
    model.save_pretrained(folder, max_shard_size=shard)
    return model


def to_legacy_format(folder: str) -> None:
    """The saved safetensors shards as PyTorch `.bin` files with their index (transformers 5 writes safetensors
    only; older loaders and tools read `pytorch_model*.bin`)."""
    import json

    import torch
    from safetensors.torch import load_file

    renamed = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("model") and name.endswith(".safetensors"):
            legacy = "pytorch_" + name.removesuffix(".safetensors") + ".bin"
            torch.save(load_file(os.path.join(folder, name)), os.path.join(folder, legacy))
            os.remove(os.path.join(folder, name))
            renamed[name] = legacy
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            content = json.load(handle)
        content["weight_map"] = {key: renamed[file] for key, file in content["weight_map"].items()}
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2)
        os.remove(index)


def export_model(cfg: Any, engine: Any) -> str:
    """Write the engine's merged model to export_dir; returns it."""
    source: ModelSource = engine.source
    target = os.path.abspath(cfg.export_dir)
    partial = f"{target}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model = engine.model.to("cpu") if cfg.export_device == "cpu" else engine.model
        shard = f"{max(1, int(cfg.export_size * 1024 * 1024))}KB"
        model.save_pretrained(partial, max_shard_size=shard)
        engine.tokenizer.save_pretrained(partial)
        if cfg.export_quantization_bit is not None:
            model = quantize_gptq(cfg, partial, engine.tokenizer, shard)
        if cfg.export_legacy_format:
            to_legacy_format(partial)
        if source.value_head:
            shutil.copy2(os.path.join(source.value_head, VALUE_HEAD_FILE), os.path.join(partial, VALUE_HEAD_FILE))
        with open(os.path.join(partial, "Modelfile"), "w", encoding="utf-8") as handle:
            handle.write(ollama_modelfile(engine.template, engine.tokenizer, cfg.default_system))
        if os.path.isdir(target):
            os.rmdir(target)  # empty: export_problems refused a folder with anything in it
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if cfg.export_hub_model_id:
        model.push_to_hub(cfg.export_hub_model_id, token=cfg.hf_hub_token, max_shard_size=f"{cfg.export_size}GB")
        engine.tokenizer.push_to_hub(cfg.export_hub_model_id, token=cfg.hf_hub_token)
    return target
