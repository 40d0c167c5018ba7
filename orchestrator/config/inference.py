"""vLLM inference engine options (infer_backend: vllm, inference/vllm_engine.py)."""

from pydantic import BaseModel

from orchestrator.config.fields import param

NEEDS = " With infer_backend vllm; needs CUDA and the vllm package (refused at the driver without them)."


class VllmArgs(BaseModel):
    vllm_maxlen: int = param(4096, "Maximum sequence length for vLLM, prompt plus generated tokens." + NEEDS, ge=1)
    vllm_gpu_util: float = param(0.9, "Fraction of GPU memory vLLM may use, in (0, 1)." + NEEDS, gt=0, lt=1)
    vllm_enforce_eager: bool = param(False, "Disable CUDA graphs in vLLM and run eagerly." + NEEDS)
    vllm_max_lora_rank: int = param(32, "Largest LoRA rank vLLM will serve." + NEEDS, ge=1)
    vllm_config: dict | str | None = param(None, "Extra vLLM engine arguments, as a mapping or a JSON string." + NEEDS)
