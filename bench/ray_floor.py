"""Ray's own floor under Loom's start-up: starting an embedded Ray, and `fit()` of a TorchTrainer whose 2 workers
(1 CPU each, gloo process group) do nothing. Whatever `loom train` spends beyond these before its first step is
Loom's. Prints one JSON object. Run by bench/suite.py; alone: `python bench/ray_floor.py`.
"""

from __future__ import annotations

import json
import os
import time

STARTED = time.perf_counter()


def empty_loop() -> None:
    pass


def main() -> None:
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    imported = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):  # a running cluster (the tests'): joining it is the floor there
        ray.init(logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)  # fmt: skip
    started = time.perf_counter()
    trainer = TorchTrainer(empty_loop, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}))
    trainer.fit()
    done = time.perf_counter()
    ray.shutdown()
    print(json.dumps({"import_s": round(imported - STARTED, 2), "ray_init_s": round(started - imported, 2),
                      "empty_fit_s": round(done - started, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
