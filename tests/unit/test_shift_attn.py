"""S²-Attn (LongLoRA shifted sparse attention): the grouping at the function level, then on the real tiny model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from workers.shift_attn import (
    ATTN_NAME,
    enable_shift_attn,
    group_size_for,
    shift_attn_enabled,
    shift_sdpa_attention_forward,
    supports_shift_attn,
)

HEADS, KV_HEADS, DIM = 4, 2, 8  # grouped-query attention: two query heads per key/value head


class Attn(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS


def qkv(length: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, length, DIM, generator=gen, dtype=torch.float64),
        torch.randn(batch, KV_HEADS, length, DIM, generator=gen, dtype=torch.float64),
        torch.randn(batch, KV_HEADS, length, DIM, generator=gen, dtype=torch.float64),
    )


def attend(q, k, v, mask=None, training=True) -> torch.Tensor:
    """(b, L, H, d) output of the registered function."""
    module = Attn().train(training)
    return shift_sdpa_attention_forward(module, q, k, v, mask, scaling=DIM**-0.5)[0]


def reference(q, k, v, group: int, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """S²-Attn spelled out: head h, query i may see key j iff j <= i, j is not padding, and both lie in one group;
    groups are [0, G), [G, 2G), ... for the first half of the heads and [0, s), [s, s + G), ... with s = ceil(G/2)
    for the second half."""
    batch, heads, length, _ = q.shape
    k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1)
    pos = torch.arange(length)
    out = torch.zeros_like(q)
    for h in range(heads):
        start = 0 if h < heads // 2 else group - group // 2
        segment = (pos + group - start) // group
        allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
        for b in range(batch):
            ok = allowed & key_valid[b][None, :] if key_valid is not None else allowed
            scores = (q[b, h] @ k[b, h].T * DIM**-0.5).masked_fill(~ok, float("-inf"))
            out[b, h] = torch.softmax(scores, -1).nan_to_num(0) @ v[b, h]
    return out.transpose(1, 2)


def perturbed_key(k, v, position: int):
    k2, v2 = k.clone(), v.clone()
    k2[:, :, position] += 3.0
    v2[:, :, position] -= 3.0
    return k2, v2


def test_group_size_is_a_quarter_of_the_sequence():
    assert [group_size_for(n) for n in (16, 17, 40, 8, 7, 1)] == [4, 4, 10, 2, 0, 0]


def test_first_half_heads_see_only_their_group():
    q, k, v = qkv(16)  # G = 4: groups [0,4) [4,8) [8,12) [12,16)
    base = attend(q, k, v)
    for outside in (0, 3, 8, 15):  # keys outside query 6's group [4, 8)
        changed = attend(q, *perturbed_key(k, v, outside))
        assert torch.equal(changed[:, 6, :2], base[:, 6, :2]), outside
    inside = attend(q, *perturbed_key(k, v, 4))
    assert not torch.allclose(inside[:, 6, :2], base[:, 6, :2])


def test_second_half_heads_see_groups_shifted_by_half_a_group():
    q, k, v = qkv(16)  # shifted groups [0,2) [2,6) [6,10) [10,14) [14,16)
    base = attend(q, k, v)
    key5 = attend(q, *perturbed_key(k, v, 5))  # same unshifted group as query 6, other shifted group
    assert not torch.allclose(key5[:, 6, :2], base[:, 6, :2])
    assert torch.equal(key5[:, 6, 2:], base[:, 6, 2:])
    key3 = attend(q, *perturbed_key(k, v, 3))  # same shifted group as query 5, other unshifted group
    assert not torch.allclose(key3[:, 5, 2:], base[:, 5, 2:])
    assert torch.equal(key3[:, 5, :2], base[:, 5, :2])


def test_no_token_sees_the_future():
    """LongLoRA's roll puts the first half group beside the last one; here those never see the end of the text."""
    q, k, v = qkv(16)
    base = attend(q, k, v)
    for late in (14, 15):
        changed = attend(q, *perturbed_key(k, v, late))
        assert torch.equal(changed[:, :late], base[:, :late])


@pytest.mark.parametrize("length", [16, 11, 13, 40])
def test_matches_the_spelled_out_definition(length):
    q, k, v = qkv(length)
    group = group_size_for(length)
    torch.testing.assert_close(attend(q, k, v), reference(q, k, v, group), atol=1e-12, rtol=0)


def test_respects_the_padding_mask():
    length = 12
    q, k, v = qkv(length)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    valid[1, -2:] = False  # right padding
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :])[:, None]  # (b, 1, L, L) like transformers' sdpa mask
    out = attend(q, k, v, mask)
    expected = reference(q, k, v, group_size_for(length), valid)
    torch.testing.assert_close(out[0, 3:], expected[0, 3:], atol=1e-12, rtol=0)  # real tokens of the left-padded row
    torch.testing.assert_close(out[1, :-2], expected[1, :-2], atol=1e-12, rtol=0)


def test_eval_mode_and_short_sequences_are_plain_causal_attention():
    q, k, v = qkv(16)
    full = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(attend(q, k, v, training=False), full, atol=1e-12, rtol=0)
    assert not torch.allclose(attend(q, k, v, training=True), full)
    q, k, v = qkv(7)  # group size 1: nothing to group or shift
    short = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(attend(q, k, v, training=True), short, atol=1e-12, rtol=0)


def test_supported_model_types():
    assert supports_shift_attn("llama") and supports_shift_attn({"model_type": "qwen2"})
    assert not supports_shift_attn("gpt2") and not supports_shift_attn(SimpleNamespace(model_type="gemma2"))
    with pytest.raises(ValueError, match="'gpt2'"):
        enable_shift_attn(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))


@pytest.fixture(scope="module")
def tiny_pair(tiny_model):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    shifted = enable_shift_attn(copy.deepcopy(original))
    return original, shifted


def tiny_batch(vocab: int, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab, (2, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    return ids, mask


def test_tiny_model_trains_with_shifted_groups_and_evaluates_with_full_attention(tiny_pair):
    original, shifted = tiny_pair
    assert shift_attn_enabled(shifted) and original.config._attn_implementation == "sdpa"
    assert shifted.config.num_attention_heads == 4 and shifted.config.num_key_value_heads == 2
    ids, mask = tiny_batch(original.config.vocab_size)
    with torch.no_grad():
        original.eval(), shifted.eval()
        torch.testing.assert_close(shifted(input_ids=ids, attention_mask=mask).logits,
                                   original(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)  # fmt: skip
        original.train(), shifted.train()
        reference_logits = original(input_ids=ids, attention_mask=mask).logits
        train_logits = shifted(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(train_logits, reference_logits, atol=1e-3)
    # the first group is causal attention for every head: identical there
    torch.testing.assert_close(train_logits[0, :3], reference_logits[0, :3], atol=1e-5, rtol=0)
    # padding is still respected: what the pad tokens are does not matter to the real ones
    other_pads = ids.clone()
    other_pads[1, :5] = 7
    with torch.no_grad():
        repadded = shifted(input_ids=other_pads, attention_mask=mask).logits
    torch.testing.assert_close(repadded[1, 5:], train_logits[1, 5:], atol=1e-6, rtol=0)


def test_tiny_model_loss_backward(tiny_pair):
    _, shifted = tiny_pair
    shifted.train()
    shifted.zero_grad()
    ids, mask = tiny_batch(shifted.config.vocab_size, length=19)  # not a multiple of the group size (4)
    loss = shifted(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grads = [p.grad for p in shifted.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert shifted.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_saved_config_does_not_name_the_implementation(tiny_pair, tmp_path):
    _, shifted = tiny_pair
    shifted.config.save_pretrained(str(tmp_path))
    assert ATTN_NAME not in (tmp_path / "config.json").read_text()
