"""Reference log-probabilities precomputed through Ray Data (`precompute_ref_logps`, a Loom extension).

Before training, a `map_batches` over an actor pool, each actor holding the frozen reference model, adds each
row's reference log-probabilities (summed over the response tokens) as columns of the tokenized data: chosen and
rejected for dpo, the example and its mismatched KL completion for kto. The training workers then read them with
the batch and never hold or run a reference model. The columns are cached with the tokens (`tokenized_path`), the
reference's identity being part of the cache fingerprint. The actors use the workers' resources, so the pass
spreads over the cluster like training does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray


class ReferenceScorer:
    """A Ray Data actor: loads the reference once, then scores batches of tokenized rows."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from orchestrator.config.schema import LoomConfig
        from workers.model import load_frozen_model, load_tokenizer_for

        from ..quantization import frozen_bits
        from ..stages import reference_source

        self.cfg = LoomConfig.model_validate(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        path, adapters = reference_source(self.cfg)
        bits = frozen_bits(self.cfg, "reference")
        model = load_frozen_model(self.cfg, path, adapters, bits, self.device)
        self.model = model if bits is not None else model.to(self.device)  # a k-bit model is placed as it loads
        self.pad_id = load_tokenizer_for(self.cfg).pad_token_id

    def _logps(self, batch: dict[str, Any]) -> np.ndarray:
        import torch

        from workers.collate import model_inputs
        from workers.losses import sequence_logps

        batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            logps, _ = sequence_logps(self.model(**model_inputs(batch)).logits, batch["labels"])
        return logps.float().cpu().numpy()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from workers.collate import pad_batch, pad_pairs

        ignore = self.cfg.ignore_pad_token_for_loss
        if "chosen_input_ids" in rows:
            chosen, rejected = np.split(self._logps(pad_pairs(rows, self.pad_id, ignore)), 2)
            return {**rows, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
        main = self._logps(pad_batch(rows["input_ids"], rows["labels"], self.pad_id, ignore))
        kl = self._logps(pad_batch(rows["kl_input_ids"], rows["kl_labels"], self.pad_id, ignore))
        return {**rows, "ref_logps": main, "ref_kl_logps": kl}


def with_reference_logps(ds: ray.data.Dataset, cfg: Any) -> ray.data.Dataset:
    """The dataset with its reference log-prob columns, computed by `ray_num_workers` actors and materialized."""
    resources = cfg.worker_resources()
    # Every actor needs blocks of its own: data prepared on the driver is one block, which one actor would score
    # alone while the others wait (300 pairs: 204 s on the small model, 2 actors). Split first, in an execution of
    # its own: the actors would hold every CPU the split's tasks need. Order is kept (workers/order.py reads it).
    ds.context.execution_options.preserve_order = True
    ds = ds.repartition(max(ds.num_blocks(), 4 * cfg.ray_num_workers)).materialize()
    return ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"config": cfg.model_dump()},
        batch_size=cfg.per_device_eval_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray_num_workers),
        num_cpus=resources.get("CPU", 1.0),
        num_gpus=resources.get("GPU", 0.0),
    ).materialize()
