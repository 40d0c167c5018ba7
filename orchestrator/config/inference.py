"""vLLM inference engine options."""

from pydantic import BaseModel

from orchestrator.config.fields import not_yet

REASON = "vLLM inference is not built yet (needs a GPU)"


class VllmArgs(BaseModel):
    vllm_maxlen: int = not_yet(4096, "Maximum sequence length for vLLM, prompt plus generated tokens.", REASON, ge=1)
    vllm_gpu_util: float = not_yet(0.9, "Fraction of GPU memory vLLM may use, in (0, 1).", REASON, gt=0, lt=1)
    vllm_enforce_eager: bool = not_yet(False, "Disable CUDA graphs in vLLM and run eagerly.", REASON)
    vllm_max_lora_rank: int = not_yet(32, "Largest LoRA rank vLLM will serve.", REASON, ge=1)
    vllm_config: dict | str | None = not_yet(
        None, "Extra vLLM engine arguments, as a mapping or a JSON string.", REASON
    )
