import json

import pytest

from edgeft.data import is_correct, load_jsonl
from edgeft.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answers": ["165"]}


def write_lines(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_loads_valid_file(tmp_path):
    exs = load_jsonl(write_lines(tmp_path, [json.dumps(GOOD)] * 3), need_answers=True)
    assert len(exs) == 3 and exs[0].reply == "a" and exs[0].prompt == GOOD["messages"][:1]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "invalid JSON"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"messages": []}), "non-empty 'messages'"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "last message must have role 'assistant'"),
        (json.dumps({"messages": [{"role": "bot", "content": "q"}]}), "messages[0]"),
        (json.dumps({**GOOD, "answers": "165"}), "'answers' must be a list"),
        (json.dumps({**GOOD, "extra": 1}), "unknown key 'extra'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, fragment):
    path = write_lines(tmp_path, [json.dumps(GOOD), bad])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert f"{path}:2:" in str(e.value) and fragment in str(e.value)


def test_eval_lines_need_answers(tmp_path):
    line = json.dumps({"messages": GOOD["messages"]})
    with pytest.raises(DataError, match=":1: held-out examples need an 'answers' list"):
        load_jsonl(write_lines(tmp_path, [line]), need_answers=True)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(write_lines(tmp_path, [""]))


@pytest.mark.parametrize(
    "reply, answers, ok",
    [
        ("Cook it to 165°F (74°C).", ["165"], True),
        ("Cook it to 1650°F.", ["165"], False),
        ("Cook it to 2165 degrees.", ["165"], False),
        ("Use  Cream of\nTartar instead", ["cream of tartar"], True),
        ("There are 3 teaspoons", ["3 teaspoons", "three teaspoons"], True),
        ("There are 33 teaspoons", ["3 teaspoons"], False),
        ("No idea.", ["165"], False),
    ],
)
def test_is_correct(reply, answers, ok):
    assert is_correct(reply, answers) is ok


def test_shipped_cooking_data_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples" / "cooking"
    train = load_jsonl(root / "train.jsonl")
    held_out = load_jsonl(root / "eval.jsonl", need_answers=True)
    assert len(train) >= 300 and len(held_out) >= 60
    train_questions = {ex.prompt[-1]["content"] for ex in train}
    assert not any(ex.prompt[-1]["content"] in train_questions for ex in held_out)
    # Every reference answer passes its own check, so a perfect model scores 100%.
    assert all(is_correct(ex.reply, ex.answers) for ex in held_out)
