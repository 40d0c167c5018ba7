"""Cross-field checks: contradictions, stage- and method-scoped keys, features not built yet, paths."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from ..environment import other_model_hub
from ..errors import Problem
from ..paths import checkpoint_kind, checkpoint_weights, is_safe_name, is_uri
from ..stages import BUILT, REFERENCE_FREE_LOSSES, STAGES, stages_reading
from ..suggest import did_you_mean
from ..trackers import requested, tracker_problems
from ..values import as_dict, split_csv
from .fields import Support
from .schema import LoomConfig, shown
from .tracking import TrackingArgs

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_PROMISED: ContextVar[frozenset[str]] = ContextVar("promised_outputs", default=frozenset())


@contextlib.contextmanager
def promised_outputs(folders: Iterable[str]) -> Iterator[None]:
    """Folders an earlier stage of a pipeline will write: the checks take them as holding what they need."""
    token = _PROMISED.set(frozenset(folders))
    try:
        yield
    finally:
        _PROMISED.reset(token)


def has_file(folder: str, name: str) -> bool:
    """Whether `folder` holds `name` (or is a pipeline stage's output, promised to)."""
    return folder in _PROMISED.get() or os.path.isfile(os.path.join(folder, name))


# Keys that only mean something for some finetuning methods: setting them elsewhere is a mistake, not a no-op.
# (Stage-scoped keys are named by the stage registry.)
METHOD_SCOPED = {
    "lora_": "lora",
    "loraplus_": "lora",
    "use_rslora": "lora",
    "use_dora": "lora",
    "pissa_": "lora",
    "additional_target": "lora",
    "create_new_adapter": "lora",
    "freeze_trainable_": "freeze",
    "freeze_extra_modules": "freeze",
}


def _non_default(cfg: LoomConfig) -> dict[str, Any]:
    return cfg.non_default_values()


def _scoped(cfg: LoomConfig) -> list[Problem]:
    problems = []
    for key, value in _non_default(cfg).items():
        stages = stages_reading(key)
        if stages and cfg.stage not in stages:
            problems.append(
                Problem(
                    key,
                    f"only used with stage {' or '.join(stages)}, but stage is {cfg.stage!r} (given {shown(key, value)})",
                )
            )
        for prefix, method in METHOD_SCOPED.items():
            if key.startswith(prefix) and cfg.finetuning_type != method:
                problems.append(
                    Problem(
                        key,
                        f"only used with finetuning_type {method!r}, but it is {cfg.finetuning_type!r} (given {shown(key, value)})",
                    )
                )
    return problems


def _contradictions(cfg: LoomConfig) -> list[Problem]:
    p = []
    if cfg.neat_packing and not cfg.packing:
        p.append(Problem("neat_packing", "needs packing: true"))
    if cfg.pissa_convert and not cfg.pissa_init:
        p.append(Problem("pissa_convert", "needs pissa_init: true"))
    if "offload_folder" in cfg.model_fields_set and cfg.quantization_device_map is None:
        p.append(Problem("offload_folder", f"given {cfg.offload_folder!r}; weights are offloaded only when an "
                                           "inference command spreads the model (quantization_device_map: auto)"))  # fmt: skip
    if cfg.bf16 and cfg.fp16:
        p.append(Problem("fp16", "bf16 and fp16 are both true; choose one"))
    if cfg.pure_bf16 and (cfg.bf16 or cfg.fp16):
        p.append(Problem("pure_bf16", "pure_bf16 trains without autocast; do not combine it with bf16/fp16"))
    if cfg.gradient_checkpointing is True and cfg.disable_gradient_checkpointing:
        p.append(Problem("gradient_checkpointing", "true, but disable_gradient_checkpointing is true too"))
    if cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size):
        p.append(Problem("val_size", f"given {cfg.val_size}; a fraction below 1 or a whole row count"))
    wants_eval = cfg.do_eval or cfg.eval_strategy != "no"
    if wants_eval and cfg.val_size == 0 and not cfg.eval_dataset:
        p.append(Problem("val_size", "evaluation is on (do_eval/eval_strategy) but there is nothing to evaluate on: "
                                     "set val_size or eval_dataset"))  # fmt: skip
    if cfg.eval_strategy == "no" and cfg.eval_steps is not None:
        p.append(Problem("eval_steps", f"given {cfg.eval_steps}, but eval_strategy is 'no'"))
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        p.append(Problem("num_train_epochs", "set max_steps or a positive num_train_epochs"))
    return p


def _stage_built(cfg: LoomConfig) -> list[Problem]:
    if cfg.stage in BUILT:
        return []
    message = (
        f"given {cfg.stage!r}; training is built for {', '.join(BUILT)} (`loom data` prepares the data of any stage)"
    )
    return [Problem("stage", message)]


def _data(cfg: LoomConfig) -> list[Problem]:
    from ..data.mixing import probability_problems
    from ..data.tools import known_tool_formats

    p = [Problem("interleave_probs", m)
         for m in probability_problems(cfg.interleave_probs, len(cfg.dataset_names()), cfg.mix_strategy)]  # fmt: skip
    if cfg.tool_format is not None and cfg.tool_format not in known_tool_formats():
        p.append(Problem("tool_format", f"given {cfg.tool_format!r}; known: {', '.join(known_tool_formats())}"))
    if cfg.eval_dataset and cfg.val_size > 0:
        p.append(Problem("val_size", f"given {cfg.val_size}, and eval_dataset is set too; use one of them"))
    if cfg.eval_on_each_dataset and not cfg.eval_dataset:
        p.append(Problem("eval_on_each_dataset", "needs eval_dataset"))
    if cfg.streaming:
        p += _streaming_problems(cfg)
    if cfg.overwrite_cache and not cfg.tokenized_path:
        p.append(Problem("overwrite_cache", "needs tokenized_path (the cache it would rebuild)"))
    return p


def _streaming_problems(cfg: LoomConfig) -> list[Problem]:
    """What a stream of unknown size cannot do: count epochs, hold out a split, interleave by counts, be cached."""
    p = []
    if cfg.max_steps <= 0:
        p.append(Problem("max_steps", "streaming: true needs max_steps (the stream's size is unknown)"))
    if cfg.val_size > 0:
        p.append(Problem("val_size", "cannot split a stream; with streaming: true use eval_dataset"))
    if cfg.mix_strategy != "concat":
        p.append(Problem("mix_strategy", f"given {cfg.mix_strategy!r}; streamed datasets are concatenated"))
    if cfg.tokenized_path:
        p.append(Problem("tokenized_path", "caching needs the whole dataset; turn streaming off to build a cache"))
    return p


def _stage_and_values(cfg: LoomConfig) -> list[Problem]:
    p = []
    if cfg.packing and not STAGES[cfg.stage].packs:
        packing = " and ".join(name for name, spec in STAGES.items() if spec.packs)
        p.append(Problem("packing", f"packing is for stages {packing}, not {cfg.stage!r}"))
    if cfg.lr_scheduler_type == "reduce_lr_on_plateau":
        p.append(Problem("lr_scheduler_type", "reduce_lr_on_plateau is not supported yet"))
    if not cfg.do_train:
        p.append(Problem("do_train", "false: evaluation-only and predict runs are not built yet"))
    p += _checkpointing_kwargs(cfg)
    if cfg.moe_aux_loss_coef is not None and STAGES[cfg.stage].value_head:
        p.append(Problem("moe_aux_loss_coef", f"given {cfg.moe_aux_loss_coef}; the router loss is weighed into the "
                                              f"language-model stages (pt, sft, dpo, kto), not {cfg.stage}'s value head"))  # fmt: skip
    if cfg.shift_attn and cfg.stage == "ppo":
        p.append(Problem("shift_attn", "not with stage ppo: its rollouts generate with full attention from the same "
                                       "model that trains with grouped attention"))  # fmt: skip
    if cfg.use_llama_pro and cfg.finetuning_type == "full":
        p.append(
            Problem("use_llama_pro", "trains only the expanded blocks: finetuning_type freeze (or lora), not full")
        )
    if cfg.torch_compile and (cfg.deepspeed or cfg.fsdp or cfg.stage == "ppo"):
        where = "stage ppo (its rollouts generate)" if cfg.stage == "ppo" else "DeepSpeed or FSDP"
        p.append(Problem("torch_compile", f"compiles the DDP model of pt, sft, rm, dpo and kto; not with {where}"))
    if cfg.compute_accuracy and not (cfg.val_size or cfg.eval_dataset):
        p.append(Problem("compute_accuracy", "true, but nothing is evaluated: set val_size or eval_dataset"))
    return p


_TRACKER_KEYS = {
    "logging_dir": "tensorboard",
    **{key: "swanlab" for key in TrackingArgs.model_fields if key != "use_swanlab"},
}


_CHECKPOINT_KWARGS = {"use_reentrant": bool, "preserve_rng_state": bool, "determinism_check": str, "debug": bool}


def _checkpointing_kwargs(cfg: LoomConfig) -> list[Problem]:
    """gradient_checkpointing_kwargs reaches torch.utils.checkpoint in the workers: checked here, not mid-run."""
    if cfg.gradient_checkpointing_kwargs is None:
        return []
    key = "gradient_checkpointing_kwargs"
    try:
        given = as_dict(cfg.gradient_checkpointing_kwargs)
    except (ValueError, TypeError) as error:
        return [Problem(key, f"given {cfg.gradient_checkpointing_kwargs!r}: {error}")]
    p = [Problem(key, f"unknown argument {name!r}; known: {', '.join(_CHECKPOINT_KWARGS)}"
                      f"{did_you_mean(name, _CHECKPOINT_KWARGS)}") for name in given if name not in _CHECKPOINT_KWARGS]  # fmt: skip
    p += [Problem(key, f"{name}: given {value!r}, a {kind.__name__} is expected") for name, value in given.items()
          if (kind := _CHECKPOINT_KWARGS.get(name)) and not isinstance(value, kind)]  # fmt: skip
    if not cfg.uses_gradient_checkpointing():
        p.append(Problem(key, "set, but gradient checkpointing is off (disable_gradient_checkpointing)"))
    return p


def _best_model(cfg: LoomConfig) -> list[Problem]:
    """load_best_model_at_end picks among the checkpoints by an evaluation metric: every checkpoint step must be an
    evaluation step, and the metric one the stage evaluates."""
    if not cfg.load_best_model_at_end:
        return [Problem(key, f"set, but load_best_model_at_end is false (given {getattr(cfg, key)!r})")
                for key in ("metric_for_best_model", "greater_is_better") if getattr(cfg, key) is not None]  # fmt: skip
    key, spec = "load_best_model_at_end", STAGES[cfg.stage]
    if cfg.stage in ("rm", "ppo"):  # as LLaMA-Factory: rm keeps a value head beside the model, ppo has no eval
        return [Problem(key, f"not built for stage {cfg.stage} (as in LLaMA-Factory); stages: pt, sft, dpo, kto")]
    p = []
    if cfg.save_strategy == "no" or cfg.save_strategy != cfg.eval_strategy:
        p.append(Problem(key, f"needs a checkpoint at evaluation steps: save_strategy ({cfg.save_strategy!r}) and "
                              f"eval_strategy ({cfg.eval_strategy!r}) must be the same, and not 'no'"))  # fmt: skip
    elif cfg.save_strategy == "steps":
        evaluated = cfg.eval_steps or cfg.logging_steps
        if cfg.save_steps >= 1 and evaluated >= 1 and cfg.save_steps % evaluated:
            p.append(Problem(key, f"needs every checkpoint step to be an evaluation step: save_steps {cfg.save_steps} "
                                  f"is not a multiple of eval_steps {evaluated}"))  # fmt: skip
    if cfg.eval_on_each_dataset:
        p.append(Problem(key, "with eval_on_each_dataset there is one metric per dataset, and no one to pick by"))
    allowed = ("loss",) + spec.metrics
    name = (cfg.metric_for_best_model or "loss").removeprefix("eval_")
    if name not in allowed:
        p.append(Problem("metric_for_best_model", f"given {cfg.metric_for_best_model!r}; stage {cfg.stage} evaluates "
                                                  f"{', '.join(allowed)}{did_you_mean(name, allowed)}"))  # fmt: skip
    return p


def _trackers(cfg: LoomConfig) -> list[Problem]:
    """Trackers that could not start, and a tracker's key set for a tracker the run does not start."""
    started = requested(cfg.report_to, cfg.use_swanlab)
    unused = [Problem(key, f"set, but {tracker} is not among the trackers (report_to: {tracker}"
                           f"{' or use_swanlab: true' if tracker == 'swanlab' else ''}; given {shown(key, getattr(cfg, key))})")
              for key, tracker in _TRACKER_KEYS.items() if key in cfg.model_fields_set and tracker not in started]  # fmt: skip
    return unused + tracker_problems(cfg.report_to, cfg.use_swanlab, cfg.swanlab_mode, cfg.swanlab_api_key)


def _preference(cfg: LoomConfig) -> list[Problem]:
    """Preference keys that contradict each other (LLaMA-Factory refuses the same), and the reference's paths."""
    p = []
    if cfg.dpo_label_smoothing and cfg.pref_loss != "sigmoid":
        p.append(Problem("dpo_label_smoothing", f"given {cfg.dpo_label_smoothing}; label smoothing is defined for "
                                                f"pref_loss sigmoid only, not {cfg.pref_loss!r}"))  # fmt: skip
    if cfg.precompute_ref_logps and cfg.streaming:
        p.append(Problem("precompute_ref_logps", "needs the whole dataset before training; turn streaming off"))
    if cfg.stage == "dpo" and cfg.pref_loss in REFERENCE_FREE_LOSSES:
        for key in ("ref_model", "ref_model_adapters", "precompute_ref_logps"):
            if getattr(cfg, key):
                p.append(Problem(key, f"pref_loss {cfg.pref_loss!r} is reference-free: no reference model is used"))
    if cfg.ref_model and not has_file(cfg.ref_model, "config.json") and not _HUB_ID.match(cfg.ref_model):
        p.append(Problem("ref_model", f"{cfg.ref_model!r} is not a model folder (no config.json) nor a hub id"))
    for adapter in split_csv(cfg.ref_model_adapters):
        if not has_file(adapter, "adapter_config.json"):
            p.append(Problem("ref_model_adapters", f"{adapter!r} is not an adapter folder (no adapter_config.json)"))
    return p


def _ppo(cfg: LoomConfig) -> list[Problem]:
    """What a ppo run needs before any worker starts: a reward of the named kind, and no evaluation set."""
    if cfg.stage != "ppo":
        return []
    p, kind, reward = [], cfg.reward_model_type, cfg.reward_model
    if not reward:
        return [Problem("reward_model", f"ppo needs a reward model (reward_model_type {kind!r}: "
                                        + {"lora": "an adapter folder trained by stage rm",
                                           "full": "a model folder trained by stage rm",
                                           "api": "the URL of a scoring endpoint"}[kind] + ")")]  # fmt: skip
    if kind == "api" and not reward.startswith(("http://", "https://")):
        p.append(Problem("reward_model", f"given {reward!r}; reward_model_type api needs an http(s) URL"))
    if kind == "lora":
        if cfg.finetuning_type != "lora":
            p.append(Problem("reward_model_type", "lora puts the reward adapter on the policy's own base, so it needs "
                                                  f"finetuning_type lora, not {cfg.finetuning_type!r}"))  # fmt: skip
        for name in ("adapter_config.json", "value_head.safetensors"):
            if not has_file(reward, name):
                p.append(Problem("reward_model", f"{reward!r} has no {name}: a lora reward model is the output of a "
                                                 "LoRA rm run"))  # fmt: skip
    if kind == "full":
        if not has_file(reward, "config.json"):
            p.append(Problem("reward_model", f"{reward!r} is not a model folder (no config.json)"))
        adapters = split_csv(cfg.reward_model_adapters)
        head = adapters[-1] if adapters else reward
        if not has_file(head, "value_head.safetensors"):
            p.append(Problem("reward_model", f"no value_head.safetensors in {head!r}: a full reward model is the "
                                             "output of an rm run (with LoRA: reward_model_adapters names it)"))  # fmt: skip
    for adapter in split_csv(cfg.reward_model_adapters):
        if not has_file(adapter, "adapter_config.json"):
            p.append(Problem("reward_model_adapters", f"{adapter!r} is not an adapter folder"))
    if cfg.reward_model_adapters and kind != "full":
        p.append(Problem("reward_model_adapters", f"only used with reward_model_type full, not {kind!r}"))
    if cfg.num_beams > 1:
        p.append(Problem("num_beams", f"given {cfg.num_beams}; ppo samples its rollouts, beam search is not a policy"))
    if cfg.is_elastic():
        p.append(Problem("ray_min_workers", "an elastic ppo run is not built: each rank's rollout buffer is sized "
                                            "from gradient_accumulation_steps x ppo_buffer_size"))  # fmt: skip
    return p


def _evaluation(cfg: LoomConfig) -> list[Problem]:
    if STAGES[cfg.stage].evaluates:
        return []
    keys = {"do_eval": cfg.do_eval, "eval_strategy": cfg.eval_strategy != "no", "val_size": cfg.val_size > 0,
            "eval_dataset": bool(cfg.eval_dataset)}  # fmt: skip
    return [Problem(key, f"stage {cfg.stage} has no evaluation loss (it is judged by the rewards it logs)")
            for key, set_ in keys.items() if set_]  # fmt: skip


def _elastic(cfg: LoomConfig) -> list[Problem]:
    if cfg.ray_min_workers is None:
        return []
    if cfg.ray_min_workers > cfg.ray_num_workers:
        return [Problem("ray_min_workers", f"given {cfg.ray_min_workers}, more than ray_num_workers "
                                           f"({cfg.ray_num_workers}), the most the run uses")]  # fmt: skip
    if cfg.is_elastic() and cfg.deepspeed is not None:
        return [Problem("ray_min_workers", "elastic worker counts with deepspeed: ZeRO saves its optimizer "
                                           "partitions per rank, and another number of ranks cannot load them "
                                           "(FSDP and DDP checkpoints reshard)")]  # fmt: skip
    return []


def _resources(cfg: LoomConfig) -> list[Problem]:
    try:
        resources = as_dict(cfg.resources_per_worker)
    except ValueError as error:
        return [Problem("resources_per_worker", f"given {cfg.resources_per_worker!r}: {error}")]
    bad = {k: v for k, v in resources.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0}
    if bad or not resources:
        return [Problem("resources_per_worker", f"given {resources!r}; a mapping of resource name to a number >= 0")]
    p = []
    gpus = float(resources.get("GPU", 0))
    if cfg.fp16 and gpus == 0:
        p.append(Problem("fp16", "fp16 needs GPU workers (resources_per_worker has no GPU); use bf16 on CPU"))
    if cfg.tf32 and gpus == 0:
        p.append(Problem("tf32", "tf32 needs GPU workers (resources_per_worker has no GPU)"))
    if cfg.flash_attn == "fa2" and gpus == 0:
        p.append(Problem("flash_attn", "fa2 needs GPU workers with flash-attn installed; use sdpa or auto on CPU"))
    return p


def _paths(cfg: LoomConfig) -> list[Problem]:
    p = []
    model = cfg.model_name_or_path
    if not model:
        p.append(Problem("model_name_or_path", "is required (a local model folder or a hub id)"))
    elif model in _PROMISED.get():
        pass
    elif not os.path.isdir(model) and not (_HUB_ID.match(model) and not model.startswith((".", "/", "~"))):
        p.append(Problem("model_name_or_path", f"folder {model!r} does not exist"))
    elif not os.path.isdir(model) and (hub := other_model_hub()):
        p.append(Problem("model_name_or_path", f"{model!r} is a hub id and {hub} is on: models are loaded from the "
                                               "Hugging Face Hub only; download it and give its local folder"))  # fmt: skip
    elif os.path.isdir(model) and not has_file(model, "config.json"):
        p.append(Problem("model_name_or_path", f"folder {model!r} has no config.json"))
    for adapter in cfg.adapters():
        if not has_file(adapter, "adapter_config.json"):
            p.append(Problem("adapter_name_or_path", f"{adapter!r} is not an adapter folder (no adapter_config.json)"))
    if cfg.adapter_folder and not cfg.adapter_name_or_path:
        p.append(Problem("adapter_folder", f"given {cfg.adapter_folder!r}, but adapter_name_or_path names no adapters"))
    if cfg.create_new_adapter and not cfg.adapter_name_or_path:
        p.append(Problem("create_new_adapter", "true, but adapter_name_or_path names no adapters to merge first"))
    if cfg.adapter_name_or_path and cfg.finetuning_type != "lora":
        p.append(
            Problem(
                "adapter_name_or_path",
                f"continuing from adapters needs finetuning_type lora, not {cfg.finetuning_type!r}",
            )
        )
    if cfg.resume_from_checkpoint:
        p += _resume_checkpoint(cfg)
    if cfg.output_dir and is_uri(cfg.output_dir):
        p.append(
            Problem("output_dir", f"given {cfg.output_dir!r}; rank 0 writes it as files: use a local or shared path")
        )
    if is_uri(cfg.ray_storage_path) and not cfg.output_dir:
        p.append(Problem("output_dir", f"is required when ray_storage_path is a URI ({cfg.ray_storage_path!r}): "
                                       "the final model is written as files on rank 0's node"))  # fmt: skip
    return p


def _resume_checkpoint(cfg: LoomConfig) -> list[Problem]:
    """An explicit checkpoint must be one of the two kinds, and hold what this run's fine-tuning method trains."""
    folder, key = cfg.resume_from_checkpoint, "resume_from_checkpoint"
    if is_uri(folder):
        return [Problem(key, f"given {folder!r}; give a local or shared folder (every worker reads it)")]
    if not os.path.isdir(folder):
        return [Problem(key, f"folder {folder!r} does not exist")]
    kind = checkpoint_kind(folder)
    if kind is None:
        return [Problem(key, f"{folder!r} is not a checkpoint: it holds neither loom_checkpoint.json (a Loom "
                             "checkpoint) nor trainer_state.json (a transformers or LLaMA-Factory checkpoint-N)")]  # fmt: skip
    weights = checkpoint_weights(folder)
    adapter = os.path.isfile(os.path.join(weights, "adapter_config.json"))
    if adapter != (cfg.finetuning_type == "lora"):
        held = "a LoRA adapter" if adapter else "full weights"
        return [Problem(key, f"{folder!r} holds {held}; finetuning_type {cfg.finetuning_type!r} needs "
                             + ("full weights" if adapter else "a LoRA adapter"))]  # fmt: skip
    if kind == "transformers" and not adapter and not os.path.isfile(os.path.join(weights, "config.json")):
        return [Problem(key, f"{folder!r} has no config.json next to its weights")]
    if kind == "transformers" and STAGES[cfg.stage].value_head:
        return [Problem(key, f"stage {cfg.stage} keeps a value head, which a transformers checkpoint's layout does "
                             "not say where to find; resume it from a Loom checkpoint")]  # fmt: skip
    return []


def _template(cfg: LoomConfig) -> list[Problem]:
    from ..data.templates import known_templates

    if cfg.template is None or cfg.template in known_templates():
        return []

    hint = did_you_mean(cfg.template, known_templates(), 0.5)
    return [Problem("template", f"given {cfg.template!r}; known: {', '.join(known_templates())}{hint}")]


def _storage(cfg: LoomConfig) -> list[Problem]:
    p = [Problem(key, f"given {getattr(cfg, key)!r}; a run name is one folder name under ray_storage_path "
                      "(letters, digits and -_., not starting with a dot)")
         for key in ("ray_run_name", "run_name") if getattr(cfg, key) and not is_safe_name(getattr(cfg, key))]  # fmt: skip
    if cfg.ray_storage_endpoint and not cfg.ray_storage_path.startswith("s3://"):
        p.append(Problem("ray_storage_endpoint", f"needs an s3:// ray_storage_path, not {cfg.ray_storage_path!r}"))
    if cfg.ray_storage_endpoint and cfg.ray_storage_filesystem:
        p.append(Problem("ray_storage_filesystem", "and ray_storage_endpoint are both set; the factory decides alone"))
    if cfg.ray_storage_filesystem:
        module_name, _, function = cfg.ray_storage_filesystem.partition(":")
        try:
            found = bool(function) and callable(getattr(importlib.import_module(module_name), function, None))
        except ImportError as error:
            found, module_name = False, f"{module_name} ({error})"
        if not found:
            p.append(Problem("ray_storage_filesystem", f"given {cfg.ray_storage_filesystem!r}; expected an importable "
                                                       f"`package.module:function` (looked in {module_name})"))  # fmt: skip
    return p


def _optimizers(cfg: LoomConfig) -> list[Problem]:
    from ..optimizers import optimizer_problems

    return optimizer_problems(cfg)


def _parallelism(cfg: LoomConfig) -> list[Problem]:
    from ..parallelism import parallelism_problems

    return parallelism_problems(cfg)


CHECKS: tuple[Callable[[LoomConfig], list[Problem]], ...] = (
    _contradictions,
    _best_model,
    _parallelism,
    _optimizers,
    _scoped,
    _stage_and_values,
    _data,
    _storage,
    _preference,
    _evaluation,
    _elastic,
    _resources,
    _paths,
    _template,
)


def _prediction(cfg: LoomConfig) -> list[Problem]:
    p = []
    if cfg.do_predict and not cfg.predict_with_generate:
        p.append(Problem("predict_with_generate", "must be true with do_predict: Loom's prediction generates answers "
                                                  "(a loss on held-out data is do_eval's)"))  # fmt: skip
    if cfg.do_predict and cfg.stage != "sft":
        p.append(Problem("do_predict", f"stage {cfg.stage!r} does not generate predictions; only sft does"))
    return p


def _datasets_named(cfg: LoomConfig) -> list[Problem]:
    if cfg.do_train and not cfg.dataset_names():
        return [Problem("dataset", "is required for training (names from dataset_info.json or file names)")]
    return []


def _kernels(cfg: LoomConfig) -> list[Problem]:
    from ..kernels import kernel_problems

    return [Problem(key, message) for key, message in kernel_problems(cfg)]


def _quantization(purpose: str) -> Callable[[LoomConfig], list[Problem]]:
    def check(cfg: LoomConfig) -> list[Problem]:
        from ..quantization import quantization_problems

        return [Problem(key, message) for key, message in quantization_problems(cfg, purpose)]

    return check


def _hub(cfg: LoomConfig) -> list[Problem]:
    from ..hub import hub_problems

    return hub_problems(cfg)


PURPOSES = {  # what a config is validated for: the checks beyond CHECKS that each use needs
    "train": (_datasets_named, _stage_built, _ppo, _prediction, _trackers, _hub, _kernels, _quantization("train")),
    "data": (_datasets_named,),  # loom data: prepares any stage's data, trainable or not yet
    "infer": (_quantization("infer"),),  # chat, api, serve, export: a model and a template, no training data
}


def cross_field_problems(cfg: LoomConfig, purpose: str = "train") -> list[Problem]:
    """Every cross-field problem of a config used for `purpose` (a key of PURPOSES)."""
    return [problem for check in CHECKS + PURPOSES[purpose] for problem in check(cfg)]


def support_problems(cfg: LoomConfig) -> list[Problem]:
    """A parameter whose feature is missing is refused when set, never silently ignored."""
    problems = []
    for key, value in _non_default(cfg).items():
        extra = LoomConfig.model_fields[key].json_schema_extra or {}
        support = extra.get("support", Support.WORKS.value)
        if support == Support.NOT_YET.value:
            problems.append(Problem(key, f"not supported yet: {extra['reason']} (given {shown(key, value)})"))
        elif support == Support.REFUSED.value:
            problems.append(Problem(key, f"refused: {extra['reason']} (given {shown(key, value)})"))
    return problems
