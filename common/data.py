"""Math problems from local files or the hub, and the prompt templates that wrap them.

`load_problems` turns any of the usual layouts (GSM8K, MATH, AIME, AMC) into rows
{"question": str, "answer": str}, where `answer` is the final answer the verifier compares
against. Rows it cannot use are skipped with one warning per file; a file with no usable row
is a `UsageError`.
"""

import json
import math
import random
import warnings
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet

from common import UsageError, arithmetic
from common.verify import extract_final_answer

ARITHMETIC = "arithmetic"  # the built-in task's name wherever a data set is expected
PROMPT_TEMPLATES: tuple[str, ...] = ("chat", "chat-boxed", "plain")
# Qwen2.5-Math's own chain-of-thought system prompt, also used by Dr. GRPO and SimpleRL-Zoo.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Hub data sets the papers use, with the config name load_dataset needs (None: the default one).
HUB_DATASETS: dict[str, str | None] = {"openai/gsm8k": "main", "HuggingFaceH4/MATH-500": None}
# Benchmarks by name: the file a local data folder holds, else the public hub data set and split.
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "math500": ("math500.jsonl", "HuggingFaceH4/MATH-500", "test"),
    "aime24": ("aime24.jsonl", "HuggingFaceH4/aime_2024", "train"),
    "amc23": ("amc23.jsonl", "math-ai/amc23", "test"),
    "gsm8k": ("gsm8k_test.jsonl", "openai/gsm8k", "test"),
}
# The benchmark copies shipped in this repository's data/ folder (sources and licences in its README).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
LOCAL_FORMATS = (".jsonl", ".json", ".parquet")
PROMPT_KEYS = ("question", "problem", "prompt")  # tried in this order when no prompt_key is given

_MALFORMED_JSON = object()  # stands in for a JSONL line that does not parse


class _SkipRow(Exception):
    """Why a row is unusable, phrased to name the field: "'answer' is empty"."""


def load_problems(
    source: str, split: str = "train", prompt_key: str | None = None, answer_key: str | None = None
) -> list[dict]:
    """Rows {"question": str, "answer": str} (answer = final answer string for the verifier).

    `source` is a local .jsonl, .json (a list of objects) or .parquet file, or a hub data set
    name such as openai/gsm8k; `split` only applies to hub data sets.
    The prompt is `prompt_key`, else the first of question/problem/prompt present. The answer is
    `answer_key`, else `answer`, else the last \\boxed{} of `solution`.
    """
    rows, unit = _read_rows(source, split)
    if not rows:
        raise UsageError(f"{source} holds no rows; pass a file with one problem per row")
    problems, skipped = [], defaultdict(list)  # skipped: reason -> row numbers (1-based)
    for number, row in rows:
        try:
            problems.append({"question": _question(row, prompt_key), "answer": _answer(row, answer_key)})
        except _SkipRow as reason:
            skipped[str(reason)].append(number)
    details = "; ".join(
        f"{reason} at {unit}{'s' * (len(numbers) > 1)} {_abbreviate(numbers)}" for reason, numbers in skipped.items()
    )
    if not problems:
        raise UsageError(
            f"{source} has no usable row ({details}); name the fields with --prompt-key/--answer-key"
        )
    if skipped:
        warnings.warn(f"{source}: skipped {len(rows) - len(problems)} of {len(rows)} rows: {details}", stacklevel=2)
    return problems


class ProblemStream:
    """The endless training stream: problem number i is the same on every run with this seed.

    "arithmetic" draws unlimited fresh problems from the built-in task; a data set is walked in
    a new seeded order each epoch. Because any position can be produced directly, a resumed
    run sees exactly the prompts it would have seen without the interruption.
    """

    def __init__(self, source: str, seed: int, prompt_key: str | None = None, answer_key: str | None = None):
        self.seed = seed
        self.problems = None if source == ARITHMETIC else load_problems(source, "train", prompt_key, answer_key)
        self._epoch_order: tuple[int, list[int]] | None = None

    def __getitem__(self, index: int) -> dict:
        if self.problems is None:
            return arithmetic.train_problem(self.seed, index)
        epoch, offset = divmod(index, len(self.problems))
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self.problems)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        return self.problems[self._epoch_order[1][offset]]


def load_eval_problems(source: str, size: int = 0, prompt_key: str | None = None, answer_key: str | None = None,
                       data_dir: str | None = None) -> list[dict]:
    """The first `size` (0: all) held-out problems of `source`.

    `source` is "arithmetic" (the built-in task's fixed 500), a benchmark name (BENCHMARKS: read
    from `data_dir`, default DEFAULT_DATA_DIR, when the folder holds a copy, else from the hub;
    their known layouts need no keys), or a file or hub data set (its test split).
    """
    if source == ARITHMETIC:
        problems = list(arithmetic.heldout_problems())
    elif source in BENCHMARKS:
        file_name, hub_name, split = BENCHMARKS[source]
        local_copy = Path(data_dir or DEFAULT_DATA_DIR) / file_name
        problems = load_problems(str(local_copy)) if local_copy.is_file() else load_problems(hub_name, split)
    else:
        problems = load_problems(source, "test", prompt_key, answer_key)
    return problems[:size] if size > 0 else problems


def render_prompt(tokenizer, question: str, template: str) -> str:
    """The full prompt text for `question`, to tokenize with add_special_tokens=False.

    "chat": the model's chat template, user turn only (for instruct models).
    "chat-boxed": the same with BOXED_INSTRUCTION as system message, Qwen2.5-Math's CoT format.
    "plain": no chat format, for base models, in the style of SimpleRL-Zoo's simple prompt
    (arXiv 2503.18892). Chat templates already contain BOS where the model wants one, so "plain"
    adds it too and every template is tokenized the same way. "Wants one" means the tokenizer
    adds it when encoding text (Llama 3): a `bos_token` alone can be a chat marker that is never
    prepended (SmolLM2's is `<|im_start|>`).
    """
    if template not in PROMPT_TEMPLATES:
        raise UsageError(f"unknown template {template!r}; use one of {', '.join(PROMPT_TEMPLATES)}")
    if template == "plain":
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("Q").input_ids[:1] == [tokenizer.bos_token_id]
        return f"{tokenizer.bos_token if adds_bos else ''}Question:\n{question}\n{BOXED_INSTRUCTION}\nAnswer:\n"
    if not tokenizer.chat_template:
        raise UsageError(f"the tokenizer has no chat template for --template {template}; use --template plain")
    messages = [{"role": "user", "content": question}]
    if template == "chat-boxed":
        messages.insert(0, {"role": "system", "content": BOXED_INSTRUCTION})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _read_rows(source: str, split: str) -> tuple[list[tuple[int, object]], str]:
    """[(row number, row)] and the word for a row number: "line" for JSONL, else "row"."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.exists():
            raise UsageError(f"no such file: {source}")
        if not path.is_file() or suffix not in LOCAL_FORMATS:
            raise UsageError(f"cannot read {source}; pass a {', '.join(LOCAL_FORMATS)} file")
        if suffix == ".parquet":
            try:
                return list(enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1)), "row"
            except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
                raise UsageError(f"cannot read {source} as parquet: {_first_line(err)}") from err
        if suffix == ".json":
            try:
                rows = json.loads(path.read_bytes())
            except ValueError:  # many .json files are JSON Lines; datasets reads both too
                return _read_jsonl(path), "line"
            if not isinstance(rows, list):
                raise UsageError(f"{source} must hold a JSON list of objects, one per problem")
            return list(enumerate(rows, start=1)), "row"
        return _read_jsonl(path), "line"
    import datasets  # here, not at the top: it takes a second to import and local files do without

    try:
        dataset = datasets.load_dataset(source, HUB_DATASETS.get(source), split=split)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, unknown split
        raise UsageError(
            f"{source!r} is not a local file and cannot be loaded from the hub (split {split!r}): a hub "
            f"data set needs network access; pass a local .jsonl or .parquet file ({_first_line(err)})"
        ) from err
    return list(enumerate(dataset, start=1)), "row"


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    rows = []
    with path.open("rb") as file:  # bytes, so that a line in a bad encoding is one malformed row
        for number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except ValueError:
                    rows.append((number, _MALFORMED_JSON))
    return rows


def _question(row, prompt_key: str | None) -> str:
    if row is _MALFORMED_JSON:
        raise _SkipRow("malformed JSON")
    if not isinstance(row, dict):
        raise _SkipRow("not an object")
    key = prompt_key or next((k for k in PROMPT_KEYS if row.get(k) is not None), None)
    if key is None or row.get(key) is None:
        raise _SkipRow(f"{key or '/'.join(PROMPT_KEYS)!r} missing")
    if not isinstance(row[key], str):
        raise _SkipRow(f"{key!r} is not text")
    if not row[key].strip():
        raise _SkipRow(f"{key!r} is empty")
    return row[key].strip()


def _answer(row: dict, answer_key: str | None) -> str:
    key = answer_key or "answer"
    if row.get(key) is not None:
        return _final_answer(row[key], key)
    if answer_key is None and isinstance(row.get("solution"), str):
        boxed = extract_final_answer(row["solution"])
        if boxed is None or not boxed.strip():
            raise _SkipRow("'answer' missing and 'solution' has no \\boxed{}")
        return boxed.strip()
    raise _SkipRow(f"{key!r} missing")


def _final_answer(value, key: str) -> str:
    """The answer string the verifier compares: GSM8K's text after ####, 27.0 -> "27"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _SkipRow(f"{key!r} is not text or a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _SkipRow(f"{key!r} is not a finite number")
        return str(int(value)) if value.is_integer() else str(value)
    text = value.strip()
    if "####" in text:  # GSM8K: worked solution, then "#### 1,234"
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not text:
        raise _SkipRow(f"{key!r} is empty")
    return text


def _abbreviate(numbers: list[int], shown: int = 10) -> str:
    listed = ", ".join(map(str, numbers[:shown]))
    return listed if len(numbers) <= shown else f"{listed} and {len(numbers) - shown} more"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
