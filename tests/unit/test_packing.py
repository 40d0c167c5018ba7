"""Packing: every token kept, and no packed sequence attends to another (on the mask and on the logits)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.data.processors import ProcessorOptions, greedy_knapsack, packed_supervised_batch
from orchestrator.data.templates import get_template
from tests.helpers import CharTokenizer
from workers.collate import model_inputs, pad_batch

TOK = CharTokenizer()


def sft(question: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "response": [{"role": "assistant", "content": answer}],
            "system": "", "tools": ""}  # fmt: skip


def test_greedy_knapsack_fills_blocks_largest_first():
    assert greedy_knapsack([5, 3, 8, 2, 9], 10) == [[9], [8, 2], [5, 3]]
    with pytest.raises(ValueError, match="cannot fit"):
        greedy_knapsack([11], 10)


@pytest.mark.parametrize("neat", [False, True])
def test_packing_keeps_every_token_and_restarts_positions(neat):
    examples = [sft("q" * n, "a" * n) for n in (1, 2, 3, 4, 5, 6)]  # "empty" template: 2n tokens each
    opts = ProcessorOptions(cutoff_len=12, packing=True, neat_packing=neat)
    out = packed_supervised_batch(TOK, get_template("empty"), examples, opts)
    blocks = out.columns["input_ids"]
    assert all(len(block) <= 12 for block in blocks)
    assert sorted(TOK.decode_ids(b) for b in blocks) == ["qqqaaa", "qqqqaaaaqqaa", "qqqqqaaaaaqa", "qqqqqqaaaaaa"]
    assert sum(map(len, blocks)) == sum(2 * n for n in range(1, 7))
    for positions, segments in zip(out.columns["position_ids"], out.columns["segment_ids"], strict=True):
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert segments == ([s for i in range(len(starts)) for s in [i + 1] * _run(positions, starts, i)] if neat
                            else [1] * len(positions))  # fmt: skip


def _run(positions, starts, i):
    end = starts[i + 1] if i + 1 < len(starts) else len(positions)
    return end - starts[i]


def test_long_examples_are_truncated_before_packing():
    out = packed_supervised_batch(
        TOK,
        get_template("empty"),
        [sft("q" * 9, "a" * 9), sft("q", "a")],
        ProcessorOptions(cutoff_len=10, packing=True),
    )
    assert sorted(TOK.decode_ids(b) for b in out.columns["input_ids"]) == ["qa", "qqqqqaaaaa"]
    assert out.truncated == 1 and not out.dropped


def test_neat_packed_batch_goes_without_a_2d_mask():
    batch = pad_batch([[5, 6, 7, 8]], [[5, 6, 7, 8]], 0, position_ids=[[0, 1, 0, 1]], segment_ids=[[1, 1, 2, 2]])
    assert model_inputs(batch)["attention_mask"] is None
    plain = pad_batch([[5, 6, 7, 8]], [[5, 6, 7, 8]], 0, position_ids=[[0, 1, 0, 1]], segment_ids=[[1, 1, 1, 1]])
    assert model_inputs(plain)["attention_mask"] is not None


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_neatly_packed_sequence_has_the_same_logits_as_alone(llama, attention):
    llama.config._attn_implementation = attention
    first, second = [3, 9, 4, 17, 22], [8, 1, 30, 12]
    batch = pad_batch([first + second, first], [first + second, first], 0,
                      position_ids=[[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4]],
                      segment_ids=[[1] * 5 + [2] * 4, [1] * 5])  # fmt: skip
    with torch.no_grad():
        packed = llama(**model_inputs(batch)).logits
        alone_first = llama(input_ids=torch.tensor([first])).logits
        alone_second = llama(input_ids=torch.tensor([second])).logits
    torch.testing.assert_close(packed[0, :5], alone_first[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, 5:], alone_second[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :5], alone_first[0], atol=1e-5, rtol=1e-4)
    # Without the block-diagonal mask the second sequence sees the first, and its logits differ.
    with torch.no_grad():
        leaky = llama(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                      attention_mask=torch.ones(1, 9, dtype=torch.long)).logits  # fmt: skip
    assert not torch.allclose(leaky[0, 5:], alone_second[0], atol=1e-3)


def _summed_loss(model, batch: dict) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def test_neat_packing_gives_the_gradient_of_the_same_sequences_unpacked(llama):
    """The fast recipe (docs/PERFORMANCE.md: neat packing) learns what the padded batch learns: the same sequences,
    packed into one row with restarting positions, give the same summed loss and the same gradient on every weight.
    Each sequence's first label is masked, as the supervised processor masks a prompt, so no sequence predicts the
    next one's first token."""
    llama.config._attn_implementation = "sdpa"
    sequences = [[3, 9, 4, 17, 22], [8, 1, 30, 12], [5, 7, 2]]
    labels = [[-100] + s[1:] for s in sequences]
    padded = pad_batch(sequences, labels, 0)
    packed = pad_batch([sum(sequences, [])], [sum(labels, [])], 0,
                       position_ids=[[i for s in sequences for i in range(len(s))]],
                       segment_ids=[[n + 1 for n, s in enumerate(sequences) for _ in s]])  # fmt: skip
    gradients = []
    for batch in (padded, packed):
        llama.zero_grad()
        loss = _summed_loss(llama, batch)
        loss.backward()
        gradients.append((loss.detach(), [p.grad.clone() for p in llama.parameters()]))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = gradients
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for packed_grad, padded_grad in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-4)
    assert padded_loss > 0 and any(g.abs().sum() > 0 for g in padded_grads)
