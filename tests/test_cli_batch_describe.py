"""`pisces describe --questions FILE --out ANSWERS.jsonl`: batched answers are the one-by-one answers, rows keep their
ids and order, chat `messages` answer like a plain question, resume answers only what is missing, bad lines are
one-line errors, and two processes write what one writes."""

import json
import subprocess
import sys

import pytest
import torch

import pisces_cli.batch_describe as batch_describe_module
from pisces_cli.commands import main


MAX_NEW_TOKENS = ["--max-new-tokens", "8"]
LONG_QUESTION = (
    "Looking carefully at every part of this picture, including the corners, the edges and the middle of it, and "
    "ignoring the plain background behind everything, tell me: how many shapes are there?"
)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def user_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def scenes_folder(tmp_path_factory):
    """4 shapes-world pictures (`images/<seed>.png`) and 10 of their questions, of different lengths, one long."""
    from pisces.shapes import sample_scene

    root = tmp_path_factory.mktemp("questions")
    (root / "images").mkdir()
    rows = []
    for seed in range(4):
        scene = sample_scene(seed)
        scene.render().save(root / "images" / f"{seed}.png")
        # Questions of several kinds (counts, colours, shapes, places) so the rows pad to different lengths.
        rows += [{"image": f"images/{seed}.png", "question": question} for question, _ in scene.qa[seed : seed + 2]]
    rows.insert(3, {"image": "images/1.png", "question": LONG_QUESTION})
    rows.insert(7, {"image": "images/2.png", "question": "Where?"})
    return root, rows


@pytest.fixture(scope="module")
def answers_one_by_one(scenes_folder):
    """The reference model's greedy answer to each question of `scenes_folder`, asked alone, from the model itself."""
    from PIL import Image

    from pisces import PiscesForConditionalGeneration, PiscesProcessor
    from pisces.reference_model import reference_model_path

    root, rows = scenes_folder
    model = PiscesForConditionalGeneration.from_pretrained(reference_model_path()).eval()
    processor = PiscesProcessor.from_pretrained(reference_model_path())
    answers = []
    for row in rows:
        image = Image.open(root / row["image"]).convert("RGB")
        text = processor.apply_chat_template(user_messages(row["question"]), add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answers.append(processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])[0].strip())
    return answers


def test_batched_answers_equal_answers_asked_one_by_one(scenes_folder, answers_one_by_one, tmp_path, capsys):
    root, rows = scenes_folder
    questions = write_lines(root / "questions.jsonl", [json.dumps(row) for row in rows])
    lengths = {len(row["question"]) for row in rows}
    assert len(lengths) > 3 and max(lengths) == len(LONG_QUESTION)
    outputs = {}
    for batch_size in ("4", "1"):
        out = tmp_path / f"answers-{batch_size}.jsonl"
        argv = ["describe", "--questions", str(questions), "--out", str(out), "--batch-size", batch_size]
        assert main(argv + MAX_NEW_TOKENS) == 0
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert summary.startswith("answered 10 questions in") and "answers/s" in summary and str(out) in summary
        outputs[batch_size] = read_jsonl(out)
    assert [record["answer"] for record in outputs["4"]] == answers_one_by_one
    assert outputs["4"] == outputs["1"]
    assert any(answers_one_by_one)  # not all empty: the comparison says something
    expected = [{"id": index, **row, "answer": answers_one_by_one[index]} for index, row in enumerate(rows)]
    assert outputs["1"] == expected
    assert [list(record) for record in outputs["1"]] == [["id", "image", "question", "answer"]] * len(rows)


def test_output_keeps_input_order_and_ids(scenes_folder, answers_one_by_one, tmp_path):
    root, rows = scenes_folder
    # Given ids (strings, integers, one that looks like another row's line index) are kept; the others are the
    # 0-based line index, blank lines counted.
    given = {0: "zeta", 2: 41, 4: "7", 5: 3}
    lines = [json.dumps({"id": given[index], **row} if index in given else row) for index, row in enumerate(rows[:6])]
    lines.insert(1, "")
    questions = write_lines(root / "with_ids.jsonl", lines)
    out = tmp_path / "answers.jsonl"
    argv = ["describe", "--questions", str(questions), "--out", str(out), "--batch-size", "4"]
    assert main(argv + MAX_NEW_TOKENS) == 0
    records = read_jsonl(out)
    assert [record["id"] for record in records] == ["zeta", 2, 41, 4, "7", 3]
    assert [record["question"] for record in records] == [row["question"] for row in rows[:6]]
    assert [record["answer"] for record in records] == answers_one_by_one[:6]


def test_chat_messages_answer_like_the_same_question(scenes_folder, answers_one_by_one, tmp_path):
    root, rows = scenes_folder
    # Alternate the two forms in one file, so each batch mixes them.
    chosen = [0, 3, 5, 8]
    records = []
    for position, index in enumerate(chosen):
        row = rows[index]
        if position % 2:
            records.append({"image": row["image"], "messages": user_messages(row["question"])})
        else:
            records.append(row)
    questions = write_lines(root / "messages.jsonl", [json.dumps(record) for record in records])
    out = tmp_path / "answers.jsonl"
    argv = ["describe", "--questions", str(questions), "--out", str(out), "--batch-size", "4"]
    assert main(argv + MAX_NEW_TOKENS) == 0
    written = read_jsonl(out)
    assert [record["answer"] for record in written] == [answers_one_by_one[index] for index in chosen]
    assert [list(record) for record in written][1] == ["id", "image", "messages", "answer"]
    assert written[1]["messages"] == user_messages(rows[3]["question"])


@pytest.fixture
def asked(monkeypatch):
    """The ids of the questions the command answers (in order), recorded as `answer_batch` is called."""
    ids = []
    answer_batch = batch_describe_module.answer_batch

    def counting_answer_batch(model, processor, batch, max_new_tokens):
        ids.extend(row["id"] for row in batch)
        return answer_batch(model, processor, batch, max_new_tokens)

    monkeypatch.setattr(batch_describe_module, "answer_batch", counting_answer_batch)
    return ids


def test_resume_answers_only_the_missing_rows_and_ends_as_an_uninterrupted_run(scenes_folder, tmp_path, capsys,
                                                                               asked):
    root, rows = scenes_folder
    questions = write_lines(root / "resume.jsonl", [json.dumps(row) for row in rows[:6]])
    argv = ["describe", "--questions", str(questions), "--batch-size", "2"] + MAX_NEW_TOKENS
    whole = tmp_path / "whole.jsonl"
    assert main(argv + ["--out", str(whole)]) == 0
    complete = whole.read_bytes()
    lines = complete.splitlines(keepends=True)
    assert len(lines) == 6

    # A run killed while writing its third line.
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    capsys.readouterr()
    assert main(argv + ["--out", str(resumed)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err, err

    asked.clear()  # the uninterrupted run's
    assert main(argv + ["--out", str(resumed), "--resume"]) == 0
    assert asked == [2, 3, 4, 5]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("answered 4 questions in") and summary.count("2 already answered") == 1, summary
    assert resumed.read_bytes() == complete

    # Resuming a finished run answers nothing; --overwrite answers everything again, to the same bytes.
    asked.clear()
    assert main(argv + ["--out", str(resumed), "--resume"]) == 0
    assert asked == []
    assert "answered 0 questions" in capsys.readouterr().out and resumed.read_bytes() == complete
    assert main(argv + ["--out", str(resumed), "--overwrite"]) == 0
    assert asked == [0, 1, 2, 3, 4, 5] and resumed.read_bytes() == complete
    assert main(argv + ["--out", str(resumed), "--resume", "--overwrite"]) == 2


def test_resume_folds_in_the_part_files_of_a_killed_two_process_run(scenes_folder, tmp_path, asked):
    root, rows = scenes_folder
    questions = write_lines(root / "parts.jsonl", [json.dumps(row) for row in rows[:6]])
    argv = ["describe", "--questions", str(questions), "--batch-size", "2"] + MAX_NEW_TOKENS
    whole = tmp_path / "whole.jsonl"
    assert main(argv + ["--out", str(whole)]) == 0
    lines = whole.read_bytes().splitlines(keepends=True)
    # Process 0 had rows 0-2 (killed while writing row 2), process 1 rows 3-5 (killed before row 5).
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(b"")
    (tmp_path / "resumed.jsonl.part-0").write_bytes(b"".join(lines[:2]) + lines[2][:20])
    (tmp_path / "resumed.jsonl.part-1").write_bytes(b"".join(lines[3:5]))
    asked.clear()
    assert main(argv + ["--out", str(resumed), "--resume"]) == 0
    assert asked == [2, 5]
    assert resumed.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.jsonl", "whole.jsonl"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "line 2 is not JSON"),
        ('{"question": "How many shapes are there?"}', "line 2 has no image"),
        ('{"image": "images/missing.png", "question": "How many shapes are there?"}', "line 2: image not found"),
        ('{"image": "images/0.png"}', "line 2 needs either a `question` or chat `messages`"),
        ('{"image": "images/0.png", "question": "Where?", "messages": []}', "line 2 needs either a `question`"),
        ('{"image": "images/0.png", "messages": [{"role": "user", "content": "no image"}]}', "found 0"),
    ],
)
def test_bad_question_lines_are_one_line_errors_naming_the_line(scenes_folder, tmp_path, capsys, bad_line, message):
    root, rows = scenes_folder
    questions = write_lines(root / "bad.jsonl", [json.dumps(rows[0]), bad_line, json.dumps(rows[1])])
    out = tmp_path / "answers.jsonl"
    assert main(["describe", "--questions", str(questions), "--out", str(out)] + MAX_NEW_TOKENS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(questions) in err, err
    assert not out.exists()


def test_existing_answers_and_bad_options_are_refused(scenes_folder, tmp_path, capsys):
    root, rows = scenes_folder
    questions = write_lines(root / "one.jsonl", [json.dumps(rows[0])])
    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": 0, "answer": "an earlier run"}\n')
    cases = [
        (["--out", str(out)], "already holds answers"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--out", str(tmp_path / "new.jsonl"), "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--out", str(tmp_path / "new.jsonl"), "--questions", str(root / "nope.jsonl")], "questions file not found"),
        ([], "--questions needs --out"),
    ]
    for extra, message in cases:
        assert main(["describe", "--questions", str(questions)] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert out.read_text() == '{"id": 0, "answer": "an earlier run"}\n'
    assert not (tmp_path / "new.jsonl").exists()


def test_two_processes_write_what_one_process_writes(scenes_folder, tmp_path):
    from conftest import CPU_LAUNCH_ENV, accelerate_launch_two_processes

    root, rows = scenes_folder
    questions = write_lines(root / "two.jsonl", [json.dumps(row) for row in rows[:7]])
    argv = ["describe", "--questions", str(questions), "--batch-size", "2"] + MAX_NEW_TOKENS
    # The one-process run under the same environment (one thread per process): thread counts change float sums.
    one = subprocess.run([sys.executable, "-m", "pisces_cli"] + argv + ["--out", str(tmp_path / "one.jsonl")],
                         env=CPU_LAUNCH_ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(accelerate_launch_two_processes() + argv + ["--out", str(tmp_path / "two.jsonl")],
                         env=CPU_LAUNCH_ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("answered 7 questions in") == 1  # one summary, from the main process
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert len(read_jsonl(tmp_path / "two.jsonl")) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # no .part-* file left
