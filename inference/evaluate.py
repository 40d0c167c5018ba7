"""`loom eval`: MMLU, C-Eval and CMMLU as LLaMA-Factory scores them, with the questions spread over Ray workers.

Each question becomes a conversation: `n_shot` dev examples of its subject as user/assistant turns, then the question
(the `lang` prompt: subject line, the four choices, "Answer:"). The chat template encodes it as the prompt of the
answer turn, and the prediction is the letter among A-D whose token has the highest logit at the position after the
prompt. A Ray Data `map_batches` over `ray_num_workers` model actors (`resources_per_worker` each) scores
`batch_size` prompts at a time. Accuracy is reported per subject, per category and on average; with `save_dir`
(refused if it exists), `results.json` (each subject's predictions, as LLaMA-Factory writes it), `results.log` (its
score lines) and `scores.json` (accuracies and counts) are written, the folder whole or not at all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import Problem

from .actors import on_model_actors
from .benchmarks import CATEGORIES, CHOICES, Question, Subject, load_subjects, parse_task, task_folder
from .source import ModelSource


@dataclass(frozen=True)
class EvalPrompt:
    """One language's question format (LLaMA-Factory's `en` and `zh` evaluation templates)."""

    system: str  # before the first turn, with {subject}
    choice: str
    answer: str

    def turn(self, question: Question) -> tuple[str, str]:
        options = "".join(self.choice.format(letter=c, text=t) for c, t in zip(CHOICES, question.choices, strict=True))
        return question.question + options + self.answer, question.answer

    def messages(self, question: Question, shots: list[Question], subject: str) -> list[dict[str, str]]:
        """The few-shot turns, then the question; the last message (the answer) is the label, not the prompt."""
        messages = []
        for example in [*shots, question]:
            prompt, answer = self.turn(example)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        messages[0]["content"] = self.system.format(subject=subject) + messages[0]["content"]
        return messages


EVAL_PROMPTS = {
    "en": EvalPrompt(
        "The following are multiple choice questions (with answers) about {subject}.\n\n",
        "\n{letter}. {text}",
        "\nAnswer:",
    ),  # fmt: skip
    "zh": EvalPrompt(
        "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n{letter}. {text}", "\n答案："
    ),
}


def shots_for(subject: Subject, index: int, n_shot: int, seed: int) -> list[Question]:
    """`n_shot` dev examples for question `index`, drawn afresh per question (as LLaMA-Factory does), from a seed so
    that a rerun asks the same prompts."""
    rng = random.Random(f"{seed}:{subject.key}:{index}")
    return rng.sample(subject.examples, min(n_shot, len(subject.examples)))


def eval_rows(cfg: Any, subjects: list[Subject]) -> list[dict[str, Any]]:
    template = EVAL_PROMPTS[cfg.lang]
    rows = []
    for subject in subjects:
        for index, question in enumerate(subject.questions):
            messages = template.messages(question, shots_for(subject, index, cfg.n_shot, cfg.seed), subject.name)
            rows.append({"subject": subject.key, "index": index, "messages": json.dumps(messages[:-1]),
                         "answer": messages[-1]["content"]})  # fmt: skip
    return rows


def eval_problems(cfg: Any) -> tuple[list[Subject], list[Problem]]:
    """The task, its files and save_dir checked at the driver; the subjects read when all is well."""
    parsed = parse_task(cfg.task)
    problems = [parsed] if isinstance(parsed, Problem) else []
    if cfg.save_dir and os.path.exists(cfg.save_dir):
        problems.append(Problem("save_dir", f"{cfg.save_dir} already exists; name a new folder for the results"))
    if problems:
        return [], problems
    name, split = parsed
    folder, problems = task_folder(cfg.task_dir, name, cfg.download_mode)
    if folder is None:
        return [], problems
    subjects, problems = load_subjects(folder, name, split)
    if not problems and not any(s.questions for s in subjects):
        problems.append(Problem("task_dir", f"{folder}: no question in the {split} split of any subject"))
    return subjects, problems


class ChoiceScorer:
    """One model actor: encodes each conversation with the chat template and picks the likeliest answer letter."""

    def __init__(self, cfg: Any, source: ModelSource):
        from orchestrator.console import quiet_process

        from .engine import Conversation, HuggingFaceEngine

        quiet_process()
        self.engine = HuggingFaceEngine(cfg, source)
        self.conversation = Conversation
        # The last token of each letter's encoding: a tokenizer that merges a leading space still ends in the letter.
        self.letter_ids = [self.engine.tokenizer.encode(c, add_special_tokens=False)[-1] for c in CHOICES]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts = [self.engine.encode(self.conversation(json.loads(m))) for m in batch["messages"]]
        logits = self.engine.next_token_logits(prompts)[:, self.letter_ids]
        return {**batch, "predict": [CHOICES[i] for i in logits.argmax(-1).tolist()]}


def accuracy_table(subjects: list[Subject], predictions: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Accuracy (percent) and question count per subject, per category and on average."""

    def score(pairs: list[tuple[str, str]]) -> dict[str, Any]:
        right = sum(p == a for p, a in pairs)
        return {"accuracy": round(100 * right / len(pairs), 2) if pairs else 0.0, "questions": len(pairs)}

    by_subject = {s.key: list(zip(predictions[s.key], [q.answer for q in s.questions], strict=True))
                  for s in subjects}  # fmt: skip
    categories = [*CATEGORIES, *sorted({s.category for s in subjects} - set(CATEGORIES))]
    table = {"Average": score([pair for pairs in by_subject.values() for pair in pairs])}
    for category in categories:
        pairs = [pair for s in subjects if s.category == category for pair in by_subject[s.key]]
        if pairs:
            table[category] = score(pairs)
    return {"categories": table, "subjects": {key: score(pairs) for key, pairs in by_subject.items()}}


def score_lines(table: dict[str, dict[str, Any]]) -> str:
    """LLaMA-Factory's results.log lines: `{category:>15}: {accuracy:.2f}`."""
    return "\n".join(f"{name:>15}: {row['accuracy']:.2f}" for name, row in table["categories"].items())


def evaluate(cfg: Any, source: ModelSource, subjects: list[Subject]) -> dict[str, Any]:
    """Score every question on the connected cluster; write save_dir whole when it is set."""
    import ray

    started = time.perf_counter()
    scored = on_model_actors(ray.data.from_items(eval_rows(cfg, subjects)), ChoiceScorer, cfg, source,
                             cfg.batch_size).take_all()  # fmt: skip
    ordered = sorted(scored, key=lambda row: row["index"])
    predictions = {s.key: [r["predict"] for r in ordered if r["subject"] == s.key] for s in subjects}
    table = accuracy_table(subjects, predictions)
    table["runtime_s"] = round(time.perf_counter() - started, 3)
    table["workers"] = cfg.ray_num_workers
    if cfg.save_dir:
        _write_results(cfg.save_dir, predictions, table)
    return table


def _write_results(save_dir: str, predictions: dict[str, list[str]], table: dict[str, Any]) -> None:
    partial = save_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    files = {
        "results.json": json.dumps({k: {str(i): p for i, p in enumerate(v)} for k, v in predictions.items()}, indent=2),
        "results.log": score_lines(table),
        "scores.json": json.dumps(table, indent=2, ensure_ascii=False) + "\n",
    }
    for name, text in files.items():
        with open(os.path.join(partial, name), "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
    os.rename(partial, save_dir)
