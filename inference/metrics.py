"""Similarity of generated answers to the reference answers, computed as LLaMA-Factory computes them, so that
`predict_results.json` numbers compare with theirs.

Per row: ROUGE-1/2/L F-scores (x100) between jieba's segmentations of the two texts joined by spaces (rouge-chinese),
0 for an empty side; BLEU-4 (x100) on characters, with NLTK's smoothing method 3 (NIST geometric sequence). The file
reports each score's mean over the rows, rounded to 4 places.
"""

from __future__ import annotations

from collections.abc import Sequence

SCORES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def row_scores(predict: str, label: str) -> dict[str, float]:
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, reference = " ".join(jieba.cut(predict)), " ".join(jieba.cut(label))
    scores: dict[str, float] = {}
    if hypothesis.split() and reference.split():
        rouge = Rouge().get_scores(hypothesis, reference)[0]
        scores.update({name: round(rouge[name]["f"] * 100, 4) for name in ("rouge-1", "rouge-2", "rouge-l")})
    else:
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def similarity(predicts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """`predict_<score>`: the mean of each score over the rows."""
    import jieba

    jieba.setLogLevel(60)  # its "building prefix dict" lines are not Loom's
    rows = [row_scores(p, label) for p, label in zip(predicts, labels, strict=True)]
    return {f"predict_{name}": round(sum(r[name] for r in rows) / max(1, len(rows)), 4) for name in SCORES}
