"""Text generation options used by `loom generate` and sampling after training."""

from pydantic import BaseModel

from orchestrator.config.fields import param


class GenerationArgs(BaseModel):
    do_sample: bool = param(True, "Sample tokens; when false, decode greedily.")
    temperature: float = param(0.95, "Sampling temperature; higher is more random.", ge=0)
    top_p: float = param(
        0.7, "Nucleus sampling: keep the smallest token set whose probability reaches top_p.", gt=0, le=1
    )
    top_k: int = param(50, "Sample only among the top_k most likely tokens.", ge=0)
    num_beams: int = param(1, "Beam width for beam search; 1 means no beam search.", ge=1)
    max_length: int = param(1024, "Maximum total length, prompt plus generated tokens.", ge=1)
    max_new_tokens: int = param(
        1024, "Maximum number of generated tokens (max_length still caps prompt plus answer).", ge=1
    )
    repetition_penalty: float = param(1.0, "Penalty on repeated tokens; above 1.0 discourages repetition.", gt=0)
    length_penalty: float = param(1.0, "Beam search length penalty; positive favours longer outputs.")
    default_system: str | None = param(None, "System message used when a conversation has none.")
    enable_thinking: bool = param(
        True, "Reasoning templates (qwen3, deepseekr1, ...): True lets the model think first (an empty thought goes "
        "to the answer in training); False puts an empty thought in the prompt so it answers at once, and drops "
        "earlier thoughts. LLaMA-Factory's later key of the same name.", source="loom",
    )  # fmt: skip
    skip_special_tokens: bool = param(True, "Drop special tokens when decoding the output.")
