"""Tier 3: the kernel keys on a CUDA GPU — Liger's kernels against eager, unsloth loading and training, and
use_unsloth_gc's offloaded checkpointing against plain checkpointing. Skipped without a GPU (and each without its
package); tests/unit/test_kernels.py covers the refusals and the CPU side."""

from __future__ import annotations

import pytest
import torch

from orchestrator.tiny import TinySpec, build_tiny_model
from workers import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory) -> str:
    """A Llama with 64-wide heads (the shape the fused kernels are tuned for), built offline."""
    spec = TinySpec(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                    warmup_steps=0)  # fmt: skip
    return build_tiny_model(str(tmp_path_factory.mktemp("kernels") / "model"), spec)


def load(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").cuda()


def batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 1000, (2, 48), generator=generator).cuda()


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1)
    )


def test_liger_keeps_logits_loss_and_gradients_close_to_eager(gpu_model, monkeypatch):
    pytest.importorskip("liger_kernel.transformers")
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # module-wide rebinds: undone after the test
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    ids = batch()
    eager = load(gpu_model)
    eager_logits = eager(input_ids=ids).logits
    eager_loss = loss_of(eager_logits, ids)
    eager_loss.backward()

    patched = load(gpu_model)
    described = kernels.apply_liger_kernel(patched)
    assert "apply_liger_kernel_to_llama: rope, rms_norm, swiglu" in described
    assert patched.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    logits = patched(input_ids=ids).logits
    loss = loss_of(logits, ids)
    loss.backward()
    torch.testing.assert_close(logits, eager_logits, atol=2e-3, rtol=2e-3)
    assert abs(loss.item() - eager_loss.item()) < 1e-4
    for (name, a), (_, b) in zip(patched.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-3, rtol=1e-2, msg=f"gradient of {name}")


def test_offloaded_checkpointing_gives_the_gradients_of_plain_training(gpu_model):
    ids = batch()
    plain = load(gpu_model)
    plain.train()
    loss_of(plain(input_ids=ids).logits, ids).backward()
    offloaded = load(gpu_model)
    offloaded.train()
    kernels.enable_offloaded_checkpointing(offloaded, {"use_reentrant": True})
    loss_of(offloaded(input_ids=ids).logits, ids).backward()
    for (name, a), (_, b) in zip(offloaded.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


def test_unsloth_loads_the_model_adds_lora_and_trains_one_step(gpu_model, tmp_path):
    pytest.importorskip("unsloth")
    model = kernels.load_with_unsloth(gpu_model, dtype=torch.bfloat16, max_length=128, gradient_checkpointing="unsloth")
    model = kernels.unsloth_peft(model, rank=8, alpha=16, dropout=0.0, targets=["q_proj", "k_proj", "v_proj",
                                 "o_proj", "gate_proj", "up_proj", "down_proj"], max_length=128,
                                 gradient_checkpointing="unsloth")  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    ids = batch()
    loss = loss_of(model(input_ids=ids).logits, ids)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(trainable, before, strict=True))
    model.save_pretrained(str(tmp_path / "adapter"))  # a checkpoint's adapter, resumed through unsloth
    resumed = kernels.load_with_unsloth(str(tmp_path / "adapter"), dtype=torch.bfloat16, max_length=128,
                                        gradient_checkpointing="unsloth")  # fmt: skip
    assert sum(p.numel() for p in resumed.parameters() if p.requires_grad) == sum(p.numel() for p in trainable)
