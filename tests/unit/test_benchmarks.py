"""`loom eval`'s pure parts: LLaMA-Factory's evaluation/ layouts read from a zip or a folder, the prompt text, the
few-shot draw, accuracy per subject and category, and every refusal at the driver. No model, no Ray."""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from types import SimpleNamespace

from inference.benchmarks import Question, Subject, load_subjects, parse_task, task_folder
from inference.evaluate import EVAL_PROMPTS, accuracy_table, eval_problems, eval_rows, score_lines, shots_for
from orchestrator.errors import Problem

MAPPING = {"algebra": {"name": "algebra", "category": "STEM"}, "law": {"name": "law", "category": "Humanities"}}
ROWS = [["1 + 1?", "1", "2", "3", "4", "B"], ["2 + 2?", "4", "5", "6", "7", "A"]]


def csv_text(rows: list[list[str]], header: list[str] | None = None) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerows(([header] if header else []) + rows)
    return out.getvalue()


def write_task(root, name: str, files: dict[str, str], zipped: bool) -> str:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "mapping.json").write_text(json.dumps(MAPPING))
    if zipped:
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as archive:
            for path, text in files.items():
                archive.writestr(path, text)
    else:
        for path, text in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(text, encoding="utf-8")
    return str(folder)


def test_task_names_are_benchmark_and_split():
    assert parse_task("mmlu_test") == ("mmlu", "test") and parse_task("ceval_validation") == ("ceval", "validation")
    assert parse_task("cmmlu_test") == ("cmmlu", "test")
    wrong = parse_task("mmlu_tset")
    assert isinstance(wrong, Problem) and wrong.key == "task" and "did you mean 'mmlu_test'" in wrong.message
    assert "cmmlu_validation" not in parse_task(None).message and "is required" in parse_task(None).message


def test_the_three_layouts_read_from_their_zip_or_their_folder(tmp_path):
    mmlu = {f"data/{f}/{s}_{f}.csv": csv_text(ROWS) for s in MAPPING for f in ("test", "dev")}
    folder = write_task(tmp_path / "a", "mmlu", mmlu, zipped=True)
    subjects, problems = load_subjects(folder, "mmlu", "test")
    assert problems == [] and [s.key for s in subjects] == ["algebra", "law"]
    assert subjects[0].questions[0] == Question("1 + 1?", ("1", "2", "3", "4"), "B") and len(subjects[0].examples) == 2
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    ceval = {f"{f}/{s}_{f}.csv": csv_text([[str(i), *r, "why"] for i, r in enumerate(ROWS)], header)
             for s in MAPPING for f in ("val", "dev")}  # fmt: skip
    subjects, problems = load_subjects(write_task(tmp_path / "b", "ceval", ceval, zipped=False), "ceval", "validation")
    assert problems == [] and subjects[1].questions[1] == Question("2 + 2?", ("4", "5", "6", "7"), "A")
    cmmlu = {f"cmmlu/{f}/{s}.csv": csv_text([[str(i), *r] for i, r in enumerate(ROWS)],
                                            ["", "Question", "A", "B", "C", "D", "Answer"])
             for s in MAPPING for f in ("test", "dev")}  # fmt: skip
    subjects, problems = load_subjects(write_task(tmp_path / "c", "cmmlu", cmmlu, zipped=True), "cmmlu", "test")
    assert problems == [] and subjects[0].questions[0].answer == "B"  # under a top folder inside the zip


def test_missing_files_and_bad_answers_are_each_named(tmp_path):
    files = {"data/test/algebra_test.csv": csv_text([["q", "1", "2", "3", "4", "E"]]),
             "data/dev/algebra_dev.csv": csv_text(ROWS), "data/dev/law_dev.csv": csv_text(ROWS)}  # fmt: skip
    subjects, problems = load_subjects(write_task(tmp_path, "mmlu", files, zipped=False), "mmlu", "test")
    assert subjects == []
    messages = [p.message for p in problems]
    assert any("subject 'algebra' has answers ['E']; expected A, B, C or D" in m for m in messages)
    assert any("subject 'law' has no data/test/law_test.csv" in m for m in messages)


def test_the_prompt_is_llamafactorys_text_in_english_and_chinese():
    question = Question("1 + 1?", ("1", "2", "3", "4"), "B")
    shot = Question("2 + 2?", ("4", "5", "6", "7"), "A")
    messages = EVAL_PROMPTS["en"].messages(question, [shot], "algebra")
    assert messages == [
        {"role": "user", "content": "The following are multiple choice questions (with answers) about algebra.\n\n"
                                    "2 + 2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"},
        {"role": "assistant", "content": "B"},
    ]  # fmt: skip
    zh = EVAL_PROMPTS["zh"].messages(question, [], "代数")
    assert (
        zh[0]["content"]
        == "以下是中国关于代数考试的单项选择题，请选出其中的正确答案。\n\n1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    )


def test_few_shot_examples_are_drawn_per_question_from_the_seed():
    examples = [Question(f"q{i}", ("a", "b", "c", "d"), "A") for i in range(6)]
    subject = Subject("algebra", "algebra", "STEM", [], examples)
    assert shots_for(subject, 0, 3, seed=7) == shots_for(subject, 0, 3, seed=7)  # a rerun asks the same prompts
    assert len({tuple(q.question for q in shots_for(subject, i, 3, seed=7)) for i in range(8)}) > 1  # per question
    assert len(shots_for(subject, 0, 10, seed=7)) == 6 and shots_for(subject, 0, 0, seed=7) == []
    cfg = SimpleNamespace(lang="en", n_shot=2, seed=7)
    rows = eval_rows(cfg, [Subject("algebra", "algebra", "STEM", examples[:2], examples)])
    assert [r["answer"] for r in rows] == ["A", "A"] and len(json.loads(rows[0]["messages"])) == 5  # 2 shots + question


def test_accuracy_per_subject_category_and_average_by_hand():
    def subject(key: str, category: str, answers: str) -> Subject:
        return Subject(key, key, category, [Question("q", ("a", "b", "c", "d"), a) for a in answers], [])

    subjects = [subject("s1", "STEM", "ABCD"), subject("s2", "STEM", "AA"), subject("s3", "Humanities", "B")]
    table = accuracy_table(subjects, {"s1": list("ABDD"), "s2": list("AB"), "s3": ["B"]})
    assert table["subjects"] == {"s1": {"accuracy": 75.0, "questions": 4}, "s2": {"accuracy": 50.0, "questions": 2},
                                 "s3": {"accuracy": 100.0, "questions": 1}}  # fmt: skip
    assert table["categories"] == {"Average": {"accuracy": 71.43, "questions": 7},
                                   "STEM": {"accuracy": 66.67, "questions": 6},
                                   "Humanities": {"accuracy": 100.0, "questions": 1}}  # fmt: skip
    assert score_lines(table) == "        Average: 71.43\n           STEM: 66.67\n     Humanities: 100.00"


def config(tmp_path):
    return SimpleNamespace(task="mmlu_test", task_dir=str(tmp_path / "evaluation"), save_dir=None,
                           download_mode="reuse_dataset_if_exists")  # fmt: skip


def test_the_driver_refuses_a_taken_save_dir_a_missing_task_and_offline_fetches(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    wrong = SimpleNamespace(**{**vars(config(tmp_path)), "task": "mmlu_tset", "save_dir": str(tmp_path / "taken")})
    _, problems = eval_problems(wrong)
    assert [p.key for p in problems] == ["task", "save_dir"]  # both at once
    _, problems = eval_problems(config(tmp_path))
    assert problems[0].key == "task_dir" and f"{tmp_path}/evaluation/mmlu has no mapping.json" in problems[0].message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, problems = task_folder("someone/benchmarks", "mmlu", "reuse_dataset_if_exists")
    assert (
        folder is None and "HF_HUB_OFFLINE is set: mmlu/ cannot be fetched from the Hub dataset" in problems[0].message
    )


def test_a_task_named_by_a_hub_repo_is_fetched_as_download_mode_says(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, repo_type, allow_patterns, force_download):  # the internet is the boundary
        asked.append((repo_id, repo_type, allow_patterns, force_download))
        write_task(tmp_path / "cache", "mmlu", {}, zipped=False)
        return str(tmp_path / "cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder, problems = task_folder("someone/benchmarks", "mmlu", "force_redownload")
    assert problems == [] and folder == os.path.join(tmp_path, "cache", "mmlu")
    assert asked == [("someone/benchmarks", "dataset", ["mmlu/*"], True)]
