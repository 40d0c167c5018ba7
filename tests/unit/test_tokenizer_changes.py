"""new_special_tokens, resize_vocab and split_special_tokens on the real tiny model and tokenizer (no Ray)."""

from __future__ import annotations

from orchestrator.data.tokenizer import TokenizerSpec, load_tokenizer
from tests.helpers import tiny_config
from workers.model import build_model


def test_new_special_tokens_are_single_ids_and_grow_the_embeddings(tiny_model):
    cfg = tiny_config(tiny_model, new_special_tokens="<tool_call>,<obs>", lora_rank=4)
    tokenizer = load_tokenizer(TokenizerSpec.from_config(cfg))
    base = load_tokenizer(TokenizerSpec.from_config(tiny_config(tiny_model)))
    assert len(tokenizer) == len(base) + 2
    ids = tokenizer.encode("a <tool_call> b", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids
    model = build_model(cfg, tokenizer=tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tokenizer) and rows % 64 == 0
    assert set(model.peft_config["default"].modules_to_save) >= {"embed_tokens", "lm_head"}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trained)


def test_resize_vocab_without_new_tokens_leaves_a_fitting_model_alone(tiny_model):
    cfg = tiny_config(tiny_model, resize_vocab=True, finetuning_type="full")
    tokenizer = load_tokenizer(TokenizerSpec.from_config(cfg))
    before = build_model(tiny_config(tiny_model, finetuning_type="full")).get_input_embeddings().weight.shape[0]
    assert build_model(cfg, tokenizer=tokenizer).get_input_embeddings().weight.shape[0] == before


def test_split_special_tokens_spells_them_out(tiny_model):
    whole = load_tokenizer(TokenizerSpec.from_config(tiny_config(tiny_model)))
    split = load_tokenizer(TokenizerSpec.from_config(tiny_config(tiny_model, split_special_tokens=True)))
    text = f"hi{whole.eos_token}"
    assert whole.eos_token_id in whole.encode(text, add_special_tokens=False)
    assert split.eos_token_id not in split.encode(text, add_special_tokens=False)


def test_the_fast_data_view_gives_the_same_ids(tiny_model):
    from orchestrator.data.tokenizer import for_data

    for split in (False, True):
        tokenizer = load_tokenizer(TokenizerSpec.from_config(tiny_config(tiny_model, split_special_tokens=split)))
        fast = for_data(tokenizer)
        texts = ["Human: hi</s>\nAssistant:", f"a{tokenizer.eos_token}b  c\n\n", "", "ünïcode 和 emoji 🙂"]
        for text in texts:
            assert fast.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
        assert fast.encode_many(texts) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        assert fast.eos_token_id == tokenizer.eos_token_id


def test_a_data_task_rebuilds_the_tokenizer_from_the_drivers_snapshot_without_transformers(tiny_model, tmp_path):
    """The driver hands its data tasks a snapshot (tokenizer.data_snapshot): a fresh process rebuilds it with the
    `tokenizers` package alone and encodes, looks up and names special tokens as the loaded tokenizer does."""
    import pickle
    import subprocess
    import sys

    from orchestrator.data.tokenizer import data_snapshot

    spec = TokenizerSpec.from_config(tiny_config(tiny_model, new_special_tokens="<tool_call>"))
    tokenizer, snapshot = load_tokenizer(spec), data_snapshot(spec)
    text = f"hello world{tokenizer.eos_token} again"
    (tmp_path / "snapshot.pkl").write_bytes(pickle.dumps(snapshot))
    probe = (
        "import pickle, sys\n"
        "from orchestrator.data.tokenizer import from_snapshot\n"
        f"fast = from_snapshot(pickle.load(open({str(tmp_path / 'snapshot.pkl')!r}, 'rb')))\n"
        f"print(fast.encode({text!r}), fast.convert_tokens_to_ids('<tool_call>'), fast.convert_tokens_to_ids('zzqq'),"
        " fast.eos_token, fast.pad_token_id, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    expected = [
        str(tokenizer.encode(text, add_special_tokens=False)).replace(" ", ""),
        str(tokenizer.convert_tokens_to_ids("<tool_call>")),
        str(tokenizer.convert_tokens_to_ids("zzqq")),
        tokenizer.eos_token,
        str(tokenizer.pad_token_id),
        "False",
    ]
    assert ["".join(out[: len(out) - 5]), *out[-5:]] == expected
