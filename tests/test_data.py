"""common/data.py and data/: the shipped benchmark files, bad rows, file formats and prompt templates."""

import hashlib
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from common import UsageError
from common.data import (BENCHMARKS, BOXED_INSTRUCTION, DEFAULT_DATA_DIR, PROMPT_TEMPLATES, ProblemStream,
                         load_eval_problems, load_problems, render_prompt)

REPOSITORY_DATA = Path(__file__).resolve().parents[1] / "data"


def data_file(name: str) -> str:
    return str(DEFAULT_DATA_DIR / name)


def write_jsonl(path: Path, lines: list) -> str:
    """Objects become JSON lines; strings are written as they are (to make malformed lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# ---- the shipped benchmark files ----


def data_readme_rows() -> dict[str, tuple[int, str]]:
    """file -> (rows, sha256) from the table of data/README.md."""
    table = {}
    for line in (REPOSITORY_DATA / "README.md").read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and (REPOSITORY_DATA / cells[0]).is_file():
            table[cells[0]] = (int(cells[1].replace(",", "")), cells[5])
    return table


def test_every_shipped_file_has_the_rows_and_sha256_its_readme_gives():
    table = data_readme_rows()
    shipped = sorted(path.name for path in REPOSITORY_DATA.iterdir() if path.name != "README.md")
    assert sorted(table) == shipped, "data/README.md must list every file in data/, and only those"
    for name, (rows, sha256) in table.items():
        content = (REPOSITORY_DATA / name).read_bytes()
        assert hashlib.sha256(content).hexdigest() == sha256, f"data/{name} differs from the copy its README describes"
        assert len(content.decode().splitlines()) == rows, name
    assert {file_name for file_name, _, _ in BENCHMARKS.values()} <= set(table)  # every name has its local copy


def test_gsm8k_final_answers_are_plain_numbers():
    problems = load_problems(data_file("gsm8k_test.jsonl"))
    assert len(problems) == 1319
    assert problems[0]["answer"] == "18"  # "...\n#### 18"
    assert all(p["answer"].lstrip("-").replace(".", "").isdigit() for p in problems)
    johnny = next(p for p in problems if p["question"].startswith("Johnny is picking up the toys"))
    assert johnny["answer"] == "2125"  # "#### 2,125"


def test_math500_answers_are_the_answer_field():
    problems = load_problems(data_file("math500.jsonl"))
    assert len(problems) == 500
    assert problems[0]["question"].startswith("Convert the point $(0,3)$")
    assert problems[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_math500_without_answer_falls_back_to_the_last_boxed_of_the_solution(tmp_path):
    rows = [json.loads(line) for line in Path(data_file("math500.jsonl")).read_text().splitlines()]
    path = write_jsonl(tmp_path / "no_answer.jsonl", [{k: v for k, v in r.items() if k != "answer"} for r in rows])
    assert [p["answer"] for p in load_problems(path)] == [r["answer"] for r in rows]


def test_amc23_float_answers_become_integers():
    problems = load_problems(data_file("amc23.jsonl"))
    assert len(problems) == 40
    assert problems[0]["answer"] == "27"  # stored as 27.0
    assert all(p["answer"].lstrip("-").isdigit() for p in problems)  # one answer is -1.0


def test_aime24_answers_keep_their_three_digit_form():
    problems = load_problems(data_file("aime24.jsonl"))
    assert len(problems) == 30
    assert problems[0]["answer"] == "204" and problems[7]["answer"] == "025"  # the verifier reads "025" as 25
    assert all(len(p["answer"]) == 3 and p["answer"].isdigit() for p in problems)
    assert problems[0]["question"].startswith("Every morning Aya goes for a $9$-kilometer-long walk")


# ---- field mapping and answer clean-up ----


def test_answers_become_the_bare_final_answer_from_any_layout(tmp_path):
    path = write_jsonl(
        tmp_path / "answers.jsonl",
        [
            {"question": "q1", "answer": "She has 1000 now.\n#### 1,000"},
            {"question": "q2", "answer": "  \\frac{1}{2} "},
            {"problem": "q3", "answer": 2.5},
            {"prompt": "q4", "answer": -3},
            {"question": "q5", "solution": "So $x=\\boxed{\\frac{1}{2}}$, not \\boxed{3}? No: $\\boxed{\\{1,2\\}}$."},
        ],
    )
    assert load_problems(path) == [
        {"question": "q1", "answer": "1000"},
        {"question": "q2", "answer": "\\frac{1}{2}"},
        {"question": "q3", "answer": "2.5"},
        {"question": "q4", "answer": "-3"},
        {"question": "q5", "answer": "\\{1,2\\}"},
    ]


def test_given_prompt_and_answer_keys_replace_the_defaults_with_no_fallback(tmp_path):
    path = write_jsonl(
        tmp_path / "custom.jsonl",
        [{"input": "What is 2+2?", "target": 4, "answer": "wrong"}, {"input": "1+1?", "solution": "\\boxed{2}"}],
    )
    with pytest.warns(UserWarning, match=r"'target' missing at line 2"):  # no fallback with a key given
        assert load_problems(path, prompt_key="input", answer_key="target") == [
            {"question": "What is 2+2?", "answer": "4"}
        ]


# ---- bad rows and bad files ----


def test_bad_rows_are_skipped_with_one_warning(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"question": "good one", "answer": "1"},
            '{"question": "broken", "answer": ',
            {"question": "no answer"},
            {"question": "empty answer", "answer": "  "},
            "",  # blank lines are not rows
            {"question": "", "answer": "2"},
            {"question": "list answer", "answer": [1, 2]},
            {"question": 7, "answer": "3"},
            {"question": "good two", "answer": 4.0},
        ],
    )
    with pytest.warns(UserWarning) as record:
        problems = load_problems(path)
    assert problems == [{"question": "good one", "answer": "1"}, {"question": "good two", "answer": "4"}]
    assert len(record) == 1
    message = str(record[0].message)
    assert "mixed.jsonl" in message and "skipped 6 of 8 rows" in message and "\n" not in message
    for part in [
        "malformed JSON at line 2",
        "'answer' missing at line 3",
        "'answer' is empty at line 4",
        "'question' is empty at line 6",
        "'answer' is not text or a number at line 7",
        "'question' is not text at line 8",
    ]:
        assert part in message


def test_long_lists_of_bad_rows_are_abbreviated(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"question": "ok", "answer": "1"}] + [{"question": "x"}] * 15)
    with pytest.warns(UserWarning, match=r"'answer' missing at lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 5 more"):
        load_problems(path)


def test_file_without_usable_rows_is_a_usage_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1}, "not json"])
    with pytest.raises(UsageError) as error:
        load_problems(path)
    message = str(error.value)
    assert "bad.jsonl" in message and "malformed JSON at line 2" in message and "\n" not in message
    assert "--prompt-key" in message


def test_empty_file_is_a_usage_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="no rows"):
        load_problems(str(tmp_path / "empty.jsonl"))


def test_missing_file_wrong_extension_and_folder_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("question,answer\n1+1,2\n")
    with pytest.raises(UsageError, match=r"\.jsonl, \.json, \.parquet"):
        load_problems(str(tmp_path / "data.csv"))
    with pytest.raises(UsageError, match="cannot read"):
        load_problems(str(tmp_path))


def test_hub_data_set_offline_is_a_usage_error(offline):
    with pytest.raises(UsageError) as error:
        load_problems("openai/gsm8k", split="test")
    message = str(error.value)
    assert "openai/gsm8k" in message and "network access" in message and ".jsonl" in message
    assert "\n" not in message


# ---- other formats ----

ROWS = [
    {"question": "What is 6*7?", "answer": "#### 42"},
    {"question": "Half of 5?", "answer": 2.5},
    {"question": "AMC-style", "answer": 27.0},
]
EXPECTED = [
    {"question": "What is 6*7?", "answer": "42"},
    {"question": "Half of 5?", "answer": "2.5"},
    {"question": "AMC-style", "answer": "27"},
]


def test_unreadable_parquet_is_a_usage_error(tmp_path):
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match="cannot read .*broken.parquet as parquet"):
        load_problems(str(tmp_path / "broken.parquet"))


def test_parquet_strings_stay_as_written_and_numbers_and_nulls_are_read_as_json_ones(tmp_path):
    table = pyarrow.table({"question": [r["question"] for r in ROWS], "answer": [str(r["answer"]) for r in ROWS]})
    pyarrow.parquet.write_table(table, tmp_path / "p.parquet")
    assert load_problems(str(tmp_path / "p.parquet")) == [
        {"question": "What is 6*7?", "answer": "42"},
        {"question": "Half of 5?", "answer": "2.5"},
        {"question": "AMC-style", "answer": "27.0"},  # a string stays as written
    ]
    numbers = pyarrow.table({"problem": ["a", "b"], "answer": [27.0, None], "solution": [None, "\\boxed{3}"]})
    pyarrow.parquet.write_table(numbers, tmp_path / "n.parquet")
    assert load_problems(str(tmp_path / "n.parquet")) == [
        {"question": "a", "answer": "27"},
        {"question": "b", "answer": "3"},  # a null answer counts as missing
    ]


def test_json_files_may_hold_a_list_or_json_lines_but_not_an_object(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    assert load_problems(str(tmp_path / "rows.json")) == EXPECTED
    (tmp_path / "lines.json").write_text("".join(json.dumps(row) + "\n" for row in ROWS))  # JSON Lines
    assert load_problems(str(tmp_path / "lines.json")) == EXPECTED
    (tmp_path / "object.json").write_text(json.dumps({"data": ROWS}))
    with pytest.raises(UsageError, match="list of objects"):
        load_problems(str(tmp_path / "object.json"))


# ---- prompt templates ----


def test_chat_templates_wrap_the_question_with_and_without_the_boxed_system_prompt(tiny_tokenizer):
    assert render_prompt(tiny_tokenizer, "What is 1+1?", "chat") == (
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tiny_tokenizer, "What is 1+1?", "chat-boxed") == (
        f"<|im_start|>system\n{BOXED_INSTRUCTION}<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain_template_needs_no_chat_template_and_adds_bos_only_where_the_tokenizer_does(tiny_tokenizer):
    expected = f"Question:\nWhat is 1+1?\n{BOXED_INSTRUCTION}\nAnswer:\n"
    assert BOXED_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    assert render_prompt(tiny_tokenizer, "What is 1+1?", "plain") == expected
    tiny_tokenizer.chat_template = None  # base models may have none; "plain" does not need one
    tiny_tokenizer.bos_token = "<|endoftext|>"  # a BOS token the tokenizer never prepends (SmolLM2) is left out
    assert render_prompt(tiny_tokenizer, "What is 1+1?", "plain") == expected
    tiny_tokenizer.add_bos_token = True  # a model whose tokenizer prepends BOS (Llama 3) gets it, as its chat template would
    assert render_prompt(tiny_tokenizer, "What is 1+1?", "plain") == "<|endoftext|>" + expected


def test_unknown_templates_and_chat_without_a_chat_template_are_usage_errors(tiny_tokenizer):
    with pytest.raises(UsageError, match="chat, chat-boxed, plain"):
        render_prompt(tiny_tokenizer, "q", "qwen-boxed")
    tiny_tokenizer.chat_template = None
    for template in PROMPT_TEMPLATES[:2]:
        with pytest.raises(UsageError, match="--template plain"):
            render_prompt(tiny_tokenizer, "q", template)


# ---- held-out sets by name, and the training stream ----


@pytest.mark.parametrize("name, rows", [("math500", 500), ("gsm8k", 1319), ("aime24", 30), ("amc23", 40)])
def test_benchmark_names_resolve_to_the_local_copies(name, rows):
    assert DEFAULT_DATA_DIR.resolve() == REPOSITORY_DATA.resolve()  # a clone reads its own copies, offline
    problems = load_eval_problems(name)
    assert len(problems) == rows and all(p["question"] and p["answer"] for p in problems)
    assert load_eval_problems(name, size=7) == problems[:7]


def test_benchmark_name_without_local_copy_goes_to_the_hub(tmp_path, offline):
    with pytest.raises(UsageError) as error:
        load_eval_problems("math500", data_dir=str(tmp_path))
    assert "HuggingFaceH4/MATH-500" in str(error.value) and "\n" not in str(error.value)


def test_problem_stream_replays_the_same_order_and_reshuffles_each_epoch():
    source = data_file("aime24.jsonl")
    stream, again = ProblemStream(source, seed=3), ProblemStream(source, seed=3)
    first_epoch = [stream[i]["question"] for i in range(30)]
    assert first_epoch == [again[i]["question"] for i in range(30)]
    assert sorted(first_epoch) == sorted(p["question"] for p in load_problems(source))
    second_epoch = [stream[30 + i]["question"] for i in range(30)]
    assert sorted(second_epoch) == sorted(first_epoch) and second_epoch != first_epoch
    assert [ProblemStream(source, seed=4)[i]["question"] for i in range(30)] != first_epoch
    arithmetic = ProblemStream("arithmetic", seed=3)
    assert arithmetic[12345] == ProblemStream("arithmetic", seed=3)[12345] != arithmetic[12346]
