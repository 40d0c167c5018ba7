"""One prepared example, decoded for people: the text the model sees and which tokens carry the loss."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from .processors import IGNORE_INDEX


def labelled_text(tokenizer: Any, labels: list[int]) -> str:
    """The label tokens decoded, with each masked run shown as `[masked N]`."""
    parts = []
    for masked, run in groupby(labels, key=lambda token: token == IGNORE_INDEX):
        run = list(run)
        parts.append(f"[masked {len(run)}]" if masked else tokenizer.decode(run, skip_special_tokens=False))
    return "".join(parts)


def describe_example(tokenizer: Any, row: dict[str, Any]) -> str:
    lines = []
    for prefix in ("", "chosen_", "rejected_", "kl_"):
        ids, labels = row.get(f"{prefix}input_ids"), row.get(f"{prefix}labels")
        if ids is None:
            continue
        ids, labels = [int(t) for t in ids], [int(t) for t in labels]
        name = prefix.rstrip("_") or "example"
        lines += [f"--- {name}: {len(ids)} tokens, {sum(t != IGNORE_INDEX for t in labels)} with loss",
                  "inputs:", tokenizer.decode(ids, skip_special_tokens=False),
                  "labels:", labelled_text(tokenizer, labels)]  # fmt: skip
    if row.get("kto_tags") is not None:
        lines.append(f"kto_tag: {'desirable' if row['kto_tags'] else 'undesirable'}")
    return "\n".join(lines)
