"""LLaMA Pro block expansion (Wu et al., 2024): add identity blocks to a decoder, then train only those.

`expand_model` cuts the N decoder layers into `num_expand` equal groups and inserts, after each group, a copy of the
group's last layer whose residual-branch output projections are zero (attention `o_proj` and MLP `down_proj`, weight
and bias). A pre-norm block computes h + attn(norm(h)) and then h + mlp(norm(h)); with those projections at zero both
branches add nothing, so every new block is an identity map and the expanded model computes what the original did.
(A norm applied to a branch output, as in Gemma's post-norms, keeps the zero: RMSNorm(0) = 0.)

Training then uses `finetuning_type: freeze`, `use_llama_pro: true` and `freeze_trainable_layers: num_expand`, which
trains the layers `llama_pro_trainable_layers` names: exactly the inserted blocks.

The expansion works on the safetensors files directly (one shard in memory at a time), so it never instantiates the
model and needs no remote code. Names are Llama-family: `<prefix>.layers.<i>.<module>...` with `o_proj`/`down_proj`
(Llama, Mistral, Qwen2/3, Gemma, Phi-3 and MoE variants whose expert down projections are called `down_proj`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from typing import Any

INFO_FILE = "loom_llama_pro.json"  # written into the expanded model: how it was made
ZEROED_MODULES = ("o_proj", "down_proj")  # the projections that write into the residual stream
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")

# config.json entries that describe layers and must follow the expansion
_PER_LAYER_LISTS = ("no_rope_layers", "layers_block_type")  # one entry per layer (plus every "*layer_types")
_INDEX_LISTS = ("mlp_only_layers", "moe_layers")  # lists of layer indices
_COUNTS = ("max_window_layers", "first_k_dense_replace")  # "the first n layers are ..."
_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


def llama_pro_trainable_layers(num_layers: int, num_trainable: int) -> list[int]:
    """Layers trained by use_llama_pro with freeze_trainable_layers=num_trainable: one every num_layers/num_trainable,
    the last of each stride (LLaMA-Factory's rule), which are the blocks `expand_model` inserts."""
    if num_trainable < 1 or num_trainable > num_layers:
        raise ValueError(
            f"use_llama_pro trains freeze_trainable_layers={num_trainable} expanded blocks; "
            f"it must be between 1 and the model's {num_layers} layers"
        )
    if num_layers % num_trainable:
        raise ValueError(
            f"use_llama_pro: the model's {num_layers} layers are not divisible by "
            f"freeze_trainable_layers={num_trainable} (set it to the num_expand the model was expanded with)"
        )
    stride = num_layers // num_trainable
    return list(range(stride - 1, num_layers, stride))


def expansion_plan(num_layers: int, num_expand: int) -> list[tuple[int, bool]]:
    """For each layer of the expanded model: (source layer, whether it is a new block)."""
    if num_expand < 1:
        raise ValueError(f"num_expand must be at least 1, got {num_expand}")
    if num_layers % num_expand:
        raise ValueError(
            f"the model's {num_layers} decoder layers cannot be split into num_expand={num_expand} equal groups; "
            f"choose a divisor of {num_layers}"
        )
    group = num_layers // num_expand
    plan = []
    for index in range(num_layers):
        plan.append((index, False))
        if (index + 1) % group == 0:
            plan.append((index, True))
    return plan


def read_llama_pro_info(model_dir: str) -> dict[str, Any] | None:
    """The expansion record `expand_model` left in a model folder, or None (not expanded by Loom, or unreadable)."""
    try:
        with open(os.path.join(model_dir, INFO_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _weight_files(source_dir: str) -> list[str]:
    index = os.path.join(source_dir, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values()))
    if os.path.isfile(os.path.join(source_dir, SAFE_WEIGHTS)):
        return [SAFE_WEIGHTS]
    raise ValueError(
        f"{source_dir} has no {SAFE_WEIGHTS} or {SAFE_INDEX}: LLaMA Pro expansion reads safetensors weights only "
        "(load and save_pretrained the model once to convert it)"
    )


def _layer_layout(keys: list[str], num_layers: int) -> tuple[str, set[str]]:
    """The decoder layers' prefix and the parameter names inside one layer; ValueError when the naming is unknown."""
    prefixes: set[str] = set()
    per_layer: dict[int, set[str]] = defaultdict(set)
    for key in keys:
        match = _LAYER_KEY.match(key)
        if match:
            prefixes.add(match["prefix"])
            per_layer[int(match["index"])].add(match["rest"])
    hint = "LLaMA Pro expansion supports Llama-family naming (model.layers.<i>.self_attn.o_proj, mlp.down_proj)"
    if len(prefixes) != 1:
        found = ", ".join(sorted(prefixes)) or "none"
        raise ValueError(f"unrecognized layer naming: expected one '<prefix>.layers.<i>.' stack, found {found}. {hint}")
    if sorted(per_layer) != list(range(num_layers)):
        raise ValueError(
            f"unrecognized layer naming: the weights hold layers {sorted(per_layer)[:8]}... but the config says "
            f"num_hidden_layers={num_layers}. {hint}"
        )
    names = per_layer[0]
    if any(per_layer[i] != names for i in range(num_layers)):
        raise ValueError(f"unrecognized layer naming: the decoder layers do not all hold the same parameters. {hint}")
    for module in ZEROED_MODULES:
        if not any(module in rest.split(".")[:-1] for rest in names):
            raise ValueError(f"unrecognized layer naming: no '{module}' projection in the decoder layers. {hint}")
    return prefixes.pop(), names


def _zeroed(rest: str) -> bool:
    return any(module in rest.split(".")[:-1] for module in ZEROED_MODULES)


def _expand_config(config: dict[str, Any], plan: list[tuple[int, bool]]) -> dict[str, Any]:
    num_layers = config["num_hidden_layers"]
    new_index = {source: position for position, (source, new) in enumerate(plan) if not new}
    inserted = {source: position for position, (source, new) in enumerate(plan) if new}
    out = dict(config)
    out["num_hidden_layers"] = len(plan)
    for key, value in config.items():
        if isinstance(value, list) and (key.endswith("layer_types") or key in _PER_LAYER_LISTS):
            if len(value) != num_layers:
                raise ValueError(f"config {key} has {len(value)} entries for {num_layers} layers; cannot expand it")
            out[key] = [value[source] for source, _ in plan]
        elif key in _INDEX_LISTS and isinstance(value, list):
            remapped = [new_index[i] for i in value] + [inserted[i] for i in value if i in inserted]
            out[key] = sorted(remapped)
        elif key in _COUNTS and isinstance(value, int):
            out[key] = sum(1 for source, _ in plan if source < value)
        elif key == "decoder_sparse_step" and value not in (None, 0, 1):
            raise ValueError(f"config decoder_sparse_step={value}: a periodic layer pattern cannot be expanded")
        elif isinstance(value, list) and len(value) == num_layers and "layer" in key and key != "num_hidden_layers":
            raise ValueError(f"config {key} looks like a per-layer setting LLaMA Pro expansion does not know")
    return out


def _check_target(target_dir: str) -> None:
    if os.path.exists(target_dir) and (not os.path.isdir(target_dir) or os.listdir(target_dir)):
        raise ValueError(f"target {target_dir} exists and is not empty; choose a new folder")


def expand_model(source_dir: str, target_dir: str, num_expand: int) -> dict[str, Any]:
    """Write `source_dir` expanded by `num_expand` identity blocks into `target_dir` (atomically: a temporary folder
    beside it, renamed at the end). Returns a summary: layers before/after and the new blocks' indices."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source_dir, target_dir = os.path.abspath(source_dir), os.path.abspath(target_dir)
    if not isinstance(num_expand, int) or isinstance(num_expand, bool):
        raise ValueError(f"num_expand must be an integer, got {num_expand!r}")
    _check_target(target_dir)
    config_path = os.path.join(source_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{source_dir} has no config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if "text_config" in config:
        raise ValueError("LLaMA Pro expansion supports text-only decoders; this config has a text_config")
    if config.get("quantization_config"):
        raise ValueError(
            "cannot expand a quantized model: zeroed quantized weights are not zero; use the fp16/bf16 one"
        )
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError("unrecognized model: config.json has no num_hidden_layers")
    plan = expansion_plan(num_layers, num_expand)
    new_config = _expand_config(config, plan)

    files = _weight_files(source_dir)
    keys = []
    for name in files:
        with safe_open(os.path.join(source_dir, name), framework="pt") as handle:
            keys.extend(handle.keys())
    prefix, layer_names = _layer_layout(keys, num_layers)
    positions: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    for position, (source, new) in enumerate(plan):
        positions[source].append((position, new))

    parent = os.path.dirname(target_dir)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(target_dir)}.expanding-", dir=parent)
    try:
        weight_map, total_size = {}, 0
        for name in files:
            tensors = {}
            with safe_open(os.path.join(source_dir, name), framework="pt") as handle:
                metadata = handle.metadata() or {}
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    match = _LAYER_KEY.match(key)
                    if not match:
                        tensors[key] = tensor
                        continue
                    rest = match["rest"]
                    for position, new in positions[int(match["index"])]:
                        if not new:
                            value = tensor
                        elif _zeroed(rest):
                            value = tensor.new_zeros(tensor.shape)
                        else:
                            value = tensor.clone()
                        tensors[f"{prefix}.{position}.{rest}"] = value
            save_file(tensors, os.path.join(scratch, name), metadata={**metadata, "format": "pt"})
            for key, tensor in tensors.items():
                weight_map[key] = name
                total_size += tensor.numel() * tensor.element_size()
        if len(files) > 1:
            with open(os.path.join(scratch, SAFE_INDEX), "w", encoding="utf-8") as handle:
                index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
                json.dump(index, handle, indent=2)
        with open(os.path.join(scratch, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(new_config, handle, indent=2, sort_keys=True)
            handle.write("\n")
        for entry in sorted(os.listdir(source_dir)):
            path = os.path.join(source_dir, entry)
            if (
                os.path.isfile(path)
                and entry not in ("config.json", INFO_FILE)
                and not entry.endswith(WEIGHT_SUFFIXES)
                and not entry.endswith(".index.json")
            ):
                shutil.copy2(path, os.path.join(scratch, entry))
        new_layers = [position for position, (_, new) in enumerate(plan) if new]
        summary = {
            "source": source_dir,
            "target": target_dir,
            "num_expand": num_expand,
            "num_layers_before": num_layers,
            "num_layers_after": len(plan),
            "new_layers": new_layers,
            "copied_from": {position: source for position, (source, new) in enumerate(plan) if new},
            "layer_prefix": prefix,
            "zeroed": sorted(rest for rest in layer_names if _zeroed(rest)),
            "train_with": {"finetuning_type": "freeze", "use_llama_pro": True, "freeze_trainable_layers": num_expand},
        }
        with open(os.path.join(scratch, INFO_FILE), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        _check_target(target_dir)  # again: something may have appeared meanwhile
        if os.path.isdir(target_dir):
            os.rmdir(target_dir)  # empty (checked); rename needs the name free or an empty folder
        os.rename(scratch, target_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return summary
