"""Loom's own demo data, written by us and generated deterministically (`python -m orchestrator.demo` rewrites it).

Small tasks a tiny model can start to learn in a few steps: arithmetic, word games, unit conversions and a few
facts about Loom itself, in alpaca format for sft and as plain text for pt. The preference sets (rm, dpo, and kto's
desirable/undesirable examples) share one rule a tiny model can learn in a few steps and a test can measure: the
preferred answer ends with the polite sign-off " Thanks.", the other one with " Whatever.".
"""

from __future__ import annotations

import json
import os
import random

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SFT_FILE = "loom_demo_sft.json"
PT_FILE = "loom_demo_pt.jsonl"
PREF_FILE = "loom_demo_pref.json"
KTO_FILE = "loom_demo_kto.json"
PREFERRED, DISPREFERRED = " Thanks.", " Whatever."

_WORDS = (
    "loom thread cloth weave spindle shuttle warp weft pattern fabric cotton linen silk wool needle button "
    "river garden window candle pencil orange violet silver copper marble harbor meadow lantern compass"
).split()
_FACTS = [
    ("What is Loom?", "Loom is a training orchestrator that fine-tunes language models on a Ray cluster."),
    ("Which config names does Loom use?", "Loom reads LLaMA-Factory's parameter names from one YAML file."),
    ("Where does Loom write checkpoints?", "Loom writes checkpoints into ray_storage_path under the run name."),
    ("How does Loom resume a run?", "Run the same command again: Loom resumes from the latest checkpoint."),
    ("What does a Loom worker run?", "Each Ray Train worker runs the stage loop: pt, sft, rm, ppo, dpo or kto."),
    ("Which fine-tuning methods does Loom offer?", "Loom trains with lora, freeze or full fine-tuning."),
]
_UNITS = [
    ("kilometres", "metres", 1000),
    ("hours", "minutes", 60),
    ("kilograms", "grams", 1000),
    ("minutes", "seconds", 60),
]


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if rng.random() < 0.5:
        return {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."}
    big, small = max(a, b), min(a, b)
    return {"instruction": f"Subtract {small} from {big}.", "input": "", "output": f"{big} - {small} = {big - small}."}


def _word_game(rng: random.Random) -> dict:
    word = rng.choice(_WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if kind == 1:
        return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
    return {
        "instruction": "How many letters does the word have?",
        "input": word,
        "output": f"{word} has {len(word)} letters.",
    }


def _units(rng: random.Random) -> dict:
    big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 12)
    return {
        "instruction": f"Convert {n} {big} to {small}.",
        "input": "",
        "output": f"{n} {big} is {n * factor} {small}.",
    }


def sft_rows(count: int = 300, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"instruction": q, "input": "", "output": a} for q, a in _FACTS]
    makers = (_arithmetic, _word_game, _units)
    while len(rows) < count:
        rows.append(makers[len(rows) % len(makers)](rng))
    return rows


def pt_rows(count: int = 200, seed: int = 11) -> list[dict]:
    """Plain text for pre-training: each demo answer followed by a sentence of random words."""
    rng = random.Random(seed)
    source = sft_rows()
    texts = []
    for index in range(count):
        row = source[index % len(source)]
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14)))
        texts.append({"text": f"{row['instruction']} {row['input']} {row['output']} The {words}.".replace("  ", " ")})
    return texts


def pref_rows(count: int = 300) -> list[dict]:
    """Ranking rows (alpaca with chosen/rejected): the same answer, signed off politely or not."""
    return [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"] + PREFERRED,
             "rejected": r["output"] + DISPREFERRED} for r in sft_rows(count)]  # fmt: skip


def kto_rows(count: int = 300) -> list[dict]:
    """Unpaired feedback (alpaca with a kto_tag): every other answer is signed off politely and tagged desirable."""
    rows = []
    for index, r in enumerate(sft_rows(count)):
        desirable = index % 2 == 0
        rows.append({"instruction": r["instruction"], "input": r["input"],
                     "output": r["output"] + (PREFERRED if desirable else DISPREFERRED), "kto_tag": desirable})  # fmt: skip
    return rows


def demo_texts() -> list[str]:
    return [f"{r['instruction']} {r['input']} {r['output']}" for r in sft_rows()] + [r["text"] for r in pt_rows()]


def dataset_info() -> dict:
    return {
        "loom_demo_sft": {"file_name": SFT_FILE},
        "loom_demo_pt": {"file_name": PT_FILE, "columns": {"prompt": "text"}},
        "loom_demo_pref": {"file_name": PREF_FILE, "ranking": True,
                           "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                       "rejected": "rejected"}},
        "loom_demo_kto": {"file_name": KTO_FILE,
                          "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                      "kto_tag": "kto_tag"}},
    }  # fmt: skip


def write_demo_data(folder: str = DATA_DIR) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, SFT_FILE), "w", encoding="utf-8") as handle:
        json.dump(sft_rows(), handle, indent=1)
        handle.write("\n")
    with open(os.path.join(folder, PT_FILE), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in pt_rows())
    for name, rows in ((PREF_FILE, pref_rows()), (KTO_FILE, kto_rows())):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
            handle.write("\n")
    with open(os.path.join(folder, "dataset_info.json"), "w", encoding="utf-8") as handle:
        json.dump(dataset_info(), handle, indent=2)
        handle.write("\n")
    return folder
