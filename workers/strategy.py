"""How the ranks share the model: DDP, DeepSpeed ZeRO or FSDP2, behind one small interface the stage loop uses.

Each strategy owns: wrapping the model and building the optimizer, the accumulation window (when gradients are
synchronised), the optimizer step (clipping included), the full weights for a transformers checkpoint (a collective
for sharded strategies: every rank calls it, rank 0 gets the tensors), and the optimizer state in a checkpoint folder
(rank 0 alone for DDP; every rank its own shard for DeepSpeed and FSDP).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from orchestrator.parallelism import fsdp_settings, load_json_setting, resolve_deepspeed, strategy_name, zero_stage

from .checkpoint import load_state
from .context import DistContext

OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint tag folder inside a Loom checkpoint
FSDP_OPTIMIZER_DIR = "optimizer"  # torch.distributed.checkpoint shards of the optimizer state

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


class DDPStrategy:
    """Every rank holds the whole model; Ray Train's prepare_model wraps it in DistributedDataParallel."""

    name = "ddp"
    sharded = False  # rank 0 alone writes the checkpoint
    autocast = True

    def __init__(self, cfg: Any, ctx: DistContext, prepare: Callable[[torch.nn.Module], torch.nn.Module]):
        self.cfg, self.ctx, self.prepare = cfg, ctx, prepare

    def loading(self) -> contextlib.AbstractContextManager:
        """Around building the model: how its weights are loaded."""
        return contextlib.nullcontext()

    def setup(self, model: torch.nn.Module, make_optimizer: MakeOptimizer) -> tuple[torch.nn.Module, Any]:
        self.model = self.prepare(model)
        self.module = self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else model
        self.optimizer = self.lr_optimizer = make_optimizer(self.model)
        return self.model, self.optimizer

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are all-reduced on the window's last micro-batch only."""
        if last or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def optimizer_step(self, scaler: Any) -> None:
        if scaler:
            scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable(self.model), self.cfg.max_grad_norm)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None  # the module's own state dict is complete on every rank

    def save_optimizer(self, folder: str) -> None:
        if self.ctx.is_main:
            torch.save(self.optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))

    def load_optimizer(self, folder: str) -> None:
        state = load_state(os.path.join(folder, OPTIMIZER_FILE))
        self.optimizer.load_state_dict(state)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that only runs forward passes (reference, reward): on the device, eval mode, no gradients."""
        return freeze(model).to(self.ctx.device)

    @contextlib.contextmanager
    def generating(self) -> Iterator[dict[str, Any]]:
        """Around `generate` on the unwrapped policy: the extra generate() arguments this strategy needs."""
        yield {}


SHARED_MEMORY_KERNEL = "deepspeed_shm_comm"  # DeepSpeed's name for its CPU shared-memory all-reduce op


def skip_shared_memory_kernel(deepspeed: Any) -> None:
    """On CPU, `init_distributed` JIT-compiles a shared-memory all-reduce kernel: a minute of g++ on every fresh
    machine, a writable extensions cache, and a lock file that a worker killed mid-compile leaves behind for the next
    one to wait on forever. The kernel only serves inference all-reduce among ranks started with LOCAL_SIZE, which
    Ray Train never sets, so training loses nothing: marking it incompatible makes DeepSpeed use gloo directly."""
    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_KERNEL] = False


class DeepSpeedStrategy:
    """DeepSpeed's engine: ZeRO stage 0-3, CPU offload. Loom's loss, schedule and logging stay the same."""

    name = "deepspeed"
    sharded = True
    autocast = False  # DeepSpeed's bf16/fp16 blocks cast the model itself

    def __init__(self, cfg: Any, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        if ctx.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        import deepspeed
        from transformers import AutoConfig

        if ctx.device.type == "cpu":
            skip_shared_memory_kernel(deepspeed)
        deepspeed.init_distributed(dist_backend="gloo" if ctx.device.type == "cpu" else "nccl")
        model_config = AutoConfig.from_pretrained(
            cfg.model_name_or_path, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code,
            token=cfg.hf_hub_token, cache_dir=cfg.cache_dir,
        )  # fmt: skip
        hidden = getattr(model_config, "hidden_size", None)
        self.config = resolve_deepspeed(load_json_setting(cfg.deepspeed), cfg, ctx.world_size, hidden)

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Under ZeRO-3, transformers loads each weight straight into its partition (DeepSpeed's zero.Init), so no
        rank ever holds the whole model."""
        if zero_stage(self.config) != 3:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        marker = HfDeepSpeedConfig(self.config)  # registers itself (a weak reference) with transformers
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del marker

    def setup(self, model: torch.nn.Module, make_optimizer: MakeOptimizer) -> tuple[torch.nn.Module, Any]:
        import deepspeed

        # With an optimizer block DeepSpeed builds its own (e.g. its CPU Adam for offload); otherwise Loom's `optim`.
        client = None if "optimizer" in self.config else make_optimizer(model)  # DeepSpeed moves the model
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=client,
            model_parameters=trainable(model) if client is None else None,
            config=self.config,
        )
        self.module = self.engine.module
        # The learning-rate schedule drives the param groups of the optimizer that DeepSpeed wraps.
        self.lr_optimizer = client or self.engine.basic_optimizer
        return self.engine, self.optimizer

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        # Windows can be shorter than gradient_accumulation_steps at an epoch's end, so the boundary is set here
        # instead of counted by DeepSpeed.
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already normalised by the window's label count
        self.engine.step()  # steps the optimizer (clipping by gradient_clipping) only at the boundary

    def optimizer_step(self, scaler: Any) -> None:
        pass  # done in backward at the window's boundary

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.engine.zero_optimization_partition_weights():  # ZeRO-3: gathered from every rank onto rank 0
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None

    def save_optimizer(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag=DEEPSPEED_DIR, save_latest=False)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under ZeRO-3 a frozen model is partitioned too, in an inference engine without an optimizer (build it
        inside `loading()` so its weights load straight into partitions); below stage 3 it is replicated."""
        freeze(model)
        if zero_stage(self.config) != 3:
            return model.to(self.ctx.device)
        import deepspeed

        config = {k: v for k, v in self.config.items() if k not in ("optimizer", "scheduler")}
        zero = {k: v for k, v in config["zero_optimization"].items() if not k.startswith("offload_optimizer")}
        engine, *_ = deepspeed.initialize(model=model, config={**config, "zero_optimization": zero})
        return freeze(engine.module)

    @contextlib.contextmanager
    def generating(self) -> Iterator[dict[str, Any]]:
        """Under ZeRO-3 every rank gathers each layer for every decoding step, so ranks that finish early keep
        stepping until all are done (synced_gpus)."""
        yield {"synced_gpus": True} if zero_stage(self.config) == 3 else {}

    def load_optimizer(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(
            folder, tag=DEEPSPEED_DIR, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/{DEEPSPEED_DIR}")


class FSDPStrategy:
    """FSDP2 (`fully_shard`): each transformer layer is a unit whose parameters are sharded over the ranks."""

    name = "fsdp"
    sharded = True
    autocast = False  # a MixedPrecisionPolicy casts per unit

    def __init__(self, cfg: Any, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.settings = fsdp_settings(cfg)

    def loading(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # every rank loads the whole model, then shards it

    def setup(self, model: torch.nn.Module, make_optimizer: MakeOptimizer) -> tuple[torch.nn.Module, Any]:
        if self.settings.offload and self.ctx.device.type == "cpu":
            self.ctx.print0("fsdp offload: the workers train on the CPU, where everything already lives")
        self.model = self.module = self._shard(model)
        self.optimizer = self.lr_optimizer = make_optimizer(model)
        return self.model, self.optimizer

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        model.to(self.ctx.device)
        options: dict[str, Any] = {"reshard_after_forward": self.settings.reshard_after_forward}
        if self.cfg.bf16:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.settings.offload and self.ctx.device.type != "cpu":
            options["offload_policy"] = CPUOffloadPolicy()
        if self.settings.wrap_layers:
            for unit in layer_units(model, self.settings.layer_classes):
                fully_shard(unit, **options)
        fully_shard(model, **options)
        return model

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model sharded like the policy (its forward gathers each unit in turn), without an optimizer."""
        return self._shard(freeze(model))

    @contextlib.contextmanager
    def generating(self) -> Iterator[dict[str, Any]]:
        """`generate` runs on a submodule, which bypasses the root unit's hooks: its parameters (embeddings, norm,
        head) are gathered around it; each layer unit gathers itself per step, so ranks step in sync."""
        # FSDP decides which unit is the root on the first forward through it; generate's first forward enters at a
        # layer, so the root is settled first (torch has no public call for it; a dummy forward would do the same).
        self.model._get_fsdp_state()._lazy_init()
        self.model.unshard()
        try:
            yield {"synced_gpus": True}
        finally:
            self.model.reshard()

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)  # reduce-scatter only on the window's last micro-batch
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def optimizer_step(self, scaler: Any) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable(self.model), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def save_optimizer(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.save(state, checkpoint_id=os.path.join(folder, FSDP_OPTIMIZER_DIR))

    def load_optimizer(self, folder: str) -> None:
        """Resharded to the current world size by torch.distributed.checkpoint, so elastic restarts keep it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(folder, FSDP_OPTIMIZER_DIR))
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


def layer_units(model: torch.nn.Module, class_names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: the named classes, or the model's own `_no_split_modules` (its decoder
    layers). Raises ValueError naming the classes the model has when none match."""
    wanted = set(class_names) or set(_no_split_modules(model))
    units = [m for m in model.modules() if type(m).__name__ in wanted]
    if not units:
        names = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"fsdp_config.transformer_layer_cls_to_wrap {sorted(wanted)} matches no module; "
                         f"the model has {', '.join(names)}")  # fmt: skip
    return units


def _no_split_modules(model: torch.nn.Module) -> list[str]:
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def make_strategy(cfg: Any, ctx: DistContext, prepare: Callable[[torch.nn.Module], torch.nn.Module]) -> Any:
    name = strategy_name(cfg)
    if name == "deepspeed":
        return DeepSpeedStrategy(cfg, ctx)
    if name == "fsdp":
        return FSDPStrategy(cfg, ctx)
    return DDPStrategy(cfg, ctx, prepare)
