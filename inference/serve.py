"""`loom serve`: the `loom api` app in Ray Serve replicas, behind Serve's HTTP proxy.

Each replica is one Ray actor with `resources_per_worker` that loads the engine once, then answers with the very app
`loom api` builds (same endpoints, errors, API key and per-replica admission rule). Serve's router spreads requests
over the replicas; with replica bounds it adds and removes replicas as the requests in flight per replica rise above
or fall below MAX_CONCURRENT. The driver checks everything (config, model, backend, placement) before Serve starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from orchestrator.console import quiet_process
from orchestrator.errors import ConfigError, Problem

from .api import ApiSettings, build_app
from .backends import load_engine
from .engine import Sampling
from .source import ModelSource

APP_NAME = "loom-api"


@dataclass(frozen=True)
class ReplicaScale:
    """How many replicas: a fixed count, or autoscaling between two bounds starting at `replicas`."""

    replicas: int
    min_replicas: int
    max_replicas: int

    @classmethod
    def resolve(cls, cfg: Any, replicas: int | None, low: int | None, high: int | None) -> ReplicaScale:
        """The CLI's numbers, else ray_num_workers (and ray_min_workers as the lower bound, as for elastic runs)."""
        count = cfg.ray_num_workers if replicas is None else replicas
        if low is None:
            low = cfg.ray_min_workers if cfg.ray_min_workers and replicas is None and high is None else count
        high = max(count, low) if high is None else high
        problems = [Problem(name, f"given {value}; at least 1") for name, value in
                    (("--replicas", count), ("--min-replicas", low), ("--max-replicas", high)) if value < 1]  # fmt: skip
        if not low <= count <= high:
            problems.append(Problem("--replicas", f"given {count}; between --min-replicas ({low}) and "
                                                  f"--max-replicas ({high})"))  # fmt: skip
        if problems:
            raise ConfigError(problems, source="loom serve")
        return cls(count, low, high)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas < self.max_replicas

    def deployment_options(self, settings: ApiSettings) -> dict[str, Any]:
        # One request over the admission rule reaches the replica, which answers it 429 at once: Serve's router
        # then holds no long queue of its own, and a client past the rule hears so instead of waiting.
        options: dict[str, Any] = {"max_ongoing_requests": settings.max_concurrent + settings.queue + 1}
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.replicas, "target_ongoing_requests": settings.max_concurrent,
            }  # fmt: skip
        else:
            options["num_replicas"] = self.replicas
        return options


class ApiReplica:
    """One Serve replica: the engine loaded once, then the API app over it."""

    def __init__(self, cfg: Any, source: ModelSource, settings: ApiSettings, base: Sampling):
        from ray import serve

        quiet_process()
        self._app = build_app(load_engine(cfg, source), settings, base)
        replica = serve.get_replica_context().replica_id.unique_id

        @self._app.middleware("http")
        async def name_the_replica(request: Any, call_next: Any) -> Any:  # which replica answered, for logs and tests
            response = await call_next(request)
            response.headers["x-loom-replica"] = replica
            return response

    def __serve_build_asgi_app__(self) -> Any:  # Serve asks for the app after the constructor (late-bound ingress)
        return self._app


def actor_options(cfg: Any) -> dict[str, Any]:
    from orchestrator.launch import forwarded_env

    resources = dict(cfg.worker_resources())
    return {
        "num_cpus": resources.pop("CPU", 1.0), "num_gpus": resources.pop("GPU", 0.0),
        "resources": resources, "runtime_env": {"env_vars": forwarded_env()},
    }  # fmt: skip


def deploy(cfg: Any, source: ModelSource, settings: ApiSettings, scale: ReplicaScale) -> str:
    """Start Serve's proxy on API_HOST:API_PORT (if this cluster has none yet) and run the app; returns its URL once
    every replica has loaded."""
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    deployment = serve.deployment(
        serve.ingress()(ApiReplica), name="LoomApi", ray_actor_options=actor_options(cfg),
        max_constructor_retry_count=2,  # a replica that cannot load its model fails the command, not 20 retries
        logging_config={"log_level": "INFO" if settings.verbose else "WARNING", "enable_access_log": settings.verbose},
        **scale.deployment_options(settings),
    )  # fmt: skip
    serve.run(deployment.bind(cfg, source, settings, Sampling.from_config(cfg)), name=APP_NAME, route_prefix="/")
    return f"http://{settings.host}:{settings.port}{settings.root_path}/v1"


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def undeploy() -> bool:
    """Remove the app; stop Serve too when no other application is left on the cluster. False: there was none."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        applications = serve.status().applications
    except RayServeException:  # no Serve on this cluster
        return False
    if APP_NAME in applications:
        serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()
    return APP_NAME in applications


def serve_until_stopped(poll_s: float = 1.0) -> None:
    """Block until Ctrl-C or SIGTERM, then take the app down."""
    import signal

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    for number in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts `loom serve &` with it ignored
        signal.signal(number, stop)
    try:
        while True:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        undeploy()
