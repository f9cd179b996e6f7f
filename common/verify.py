"""Rewards from math-verify: 1.0 when a completion's final answer equals the gold answer, else 0.0.

What counts as the final answer
    The content of the completion's last `\\boxed{...}`, or failing that the number after its last
    GSM8K-style `#### `. A completion with neither scores 0. math-verify's own `parse` would look
    further, at the last LaTeX expression or bare number anywhere in the text (it reads "maybe 72,
    or 73" as 73); we do not, because in a reference trainer writing the answer in the asked-for
    format is part of the task, and a reward that guesses at free text is a noisy reward.
    Gold and answer are both wrapped in `\\boxed{}` and compared by math-verify, which equates
    `\\frac{1}{2}` and `0.5`, `1,000` and `1000`, `x=3` and `3`, `27.0` and `27`.

Bounding the time
    Cheap checks come first: identical strings score 1 at once, and answers that are too long,
    nested too deeply or denote a huge number score 0 at once (see `_refused`). Everything else
    goes to sympy, and a short answer can keep sympy busy for hours (`\\gcd(9^{9^{10}}, 6)`).
    That cannot be stopped reliably inside this process: math-verify's timeouts use
    `signal.alarm`, which works only in the main thread, has 1-second resolution, and waits until
    a long computation in C returns (that example ignores the alarm for 13 s and grows to 3 GB).
    So all sympy work runs in one child process. It interrupts itself after SOFT_TIMEOUT_S (it is
    its own main thread, so signals work there); if that fails, this process kills it after
    HARD_TIMEOUT_S and starts a fresh one. Every call is therefore bounded and safe from any
    thread; calls from several threads take turns. Unix only (select on pipes, setitimer).
"""

import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading

ANSWER_MAX_CHARS = 300  # the longest MATH-500 answer has 53 characters
MAX_NESTING = 6  # brackets in brackets: MATH-500 answers reach 2; each level costs 0.05-0.2 s to parse
SOFT_TIMEOUT_S = 2.0  # most comparisons take 1-10 ms, MATH-500's slowest 0.2-0.5 s
HARD_TIMEOUT_S = 5.0
WORKER_MEMORY_BYTES = 2 * 1024**3  # so that a huge number cannot take the machine's memory
WORKER_START_TIMEOUT_S = 60.0  # importing sympy takes about 1 s, far more on a loaded machine

# The number in a GSM8K-style final line: "#### 1,000", "#### $18", "#### -3.5".
_GSM8K_NUMBER = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")
# A numeric power tower (10^{10^{10}}, 10^9^9), or an exponent or factorial of five or more
# digits: sympy would work such a number out digit by digit, and no MATH-500, GSM8K, AIME or AMC
# answer looks like one. The timeouts still bound what this misses, such as (10^{100})!.
_HUGE_NUMBER = re.compile(r"\^\s*\{?\s*\d+\s*\}?\s*\^|\^\s*\{?\s*-?\d{5}|\d{5}\s*!")

_SHORT_INTEGER = re.compile(r"-?\d{1,15}")

logger = logging.getLogger(__name__)


def score(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals gold, else 0.0. Never raises; time-bounded.

    `gold` is a final-answer string ("72", "\\frac{1}{2}", "27.0"). Any completion text gets 0.0
    or 1.0 within about HARD_TIMEOUT_S. The one error raised is a RuntimeError when the worker
    process cannot start at all (a broken install), rather than silently scoring everything 0.
    """
    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    if answer.strip() and answer.strip() == gold.strip():
        return 1.0  # math-verify equates every gold answer in our data with itself (tested)
    if _SHORT_INTEGER.fullmatch(answer.strip()) and _SHORT_INTEGER.fullmatch(gold.strip()):
        # Plain integers (the built-in task, most of GSM8K) compare exactly without sympy, as
        # math-verify would: it is exact on integers this short ("025" equals "25").
        return float(int(answer) == int(gold))
    if _refused(answer):
        return 0.0
    return 1.0 if _worker.equivalent(gold, answer) else 0.0


def score_batch(completions: list[str], golds: list[str]) -> list[float]:
    """score() for each (completion, gold) pair."""
    return [score(completion, gold) for completion, gold in zip(completions, golds, strict=True)]


def extract_final_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), else the number after a GSM8K '#### ', else None.

    Only the last `\\boxed{` counts: if its braces never close (a cut-off completion) the answer
    is None, not an earlier box. Content longer than ANSWER_MAX_CHARS also gives None, which keeps
    this scan short on hostile text.
    """
    start = text.rfind("\\boxed{")
    if start != -1:
        return _braced_content(text, start + len("\\boxed{"))
    start = text.rfind("####")
    if start != -1:
        number = _GSM8K_NUMBER.match(text, start)
        if number and len(number[1]) <= ANSWER_MAX_CHARS:
            return number[1]
    return None


def _braced_content(text: str, begin: int) -> str | None:
    """text[begin:end], where text[end] is the `}` closing the brace opened just before `begin`."""
    depth = 1
    position = begin
    while position < len(text) and position - begin <= ANSWER_MAX_CHARS:
        char = text[position]
        if char == "\\":
            position += 2  # skip the escaped character: \{ and \} are literal braces
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position]
        position += 1
    return None


def _refused(answer: str) -> bool:
    """Whether the answer is scored 0 without sympy: it would only cost seconds to reject."""
    depth = deepest = 0
    for char in answer:
        if char in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")}]":
            depth -= 1
    return deepest > MAX_NESTING or _HUGE_NUMBER.search(answer) is not None


class _Worker:
    """The child process that runs math-verify (see the module docstring), restarted when it hangs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._process = None
        self._owner_pid = None  # a forked copy of this process must not share our child's pipes

    def equivalent(self, gold: str, answer: str) -> bool:
        with self._lock:
            if self._process is None or self._process.poll() is not None or self._owner_pid != os.getpid():
                self._start()
            try:
                self._process.stdin.write(json.dumps([gold, answer]) + "\n")
                self._process.stdin.flush()
                reply = self._read_line(HARD_TIMEOUT_S)
            except BrokenPipeError:  # it died since the poll() above
                reply = None
            if reply is None:
                logger.warning("math-verify gave no answer within %s s for %r; scored 0 and restarted it", HARD_TIMEOUT_S, answer[:80])
                self._stop()
                return False
            return reply == "1"

    def _start(self):
        self._stop()
        # -P: do not put common/ on sys.path, where a module could shadow a standard library one.
        self._process = subprocess.Popen(
            [sys.executable, "-P", __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, encoding="utf-8"
        )
        self._owner_pid = os.getpid()
        if self._read_line(WORKER_START_TIMEOUT_S) != "ready":
            self._stop()
            raise RuntimeError("the math-verify worker process did not start; its error is printed above")

    def _read_line(self, timeout_s: float) -> str | None:
        """The worker's next line, or None if it sends none within timeout_s or has died."""
        readable, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        line = self._process.stdout.readline() if readable else ""
        return line.strip() if line else None

    def _stop(self):
        if self._process is not None and self._owner_pid == os.getpid():
            self._process.kill()
            self._process.wait()
        self._process = None


_worker = _Worker()


# ---- Everything below runs only in the worker process. ----


class _SoftTimeout(BaseException):
    """Raised by SIGALRM. A BaseException, so that math-verify's `except Exception` cannot swallow it."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return _parse(gold)  # the same gold is compared with every completion of its group


def _parse(answer: str):
    from math_verify import LatexExtractionConfig, parse

    return parse("\\boxed{" + answer + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)


def _equivalent_within_soft_timeout(gold: str, answer: str) -> bool:
    from math_verify import verify

    signal.setitimer(signal.ITIMER_REAL, SOFT_TIMEOUT_S)
    try:
        return verify(_parse_gold(gold), _parse(answer), timeout_seconds=None)
    except (_SoftTimeout, Exception):  # Exception includes MemoryError and RecursionError
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _serve():
    """Answer each `[gold, answer]` JSON line on stdin with a line "1" (equivalent) or "0" on stdout."""
    import resource

    # math-verify warns that its own timeouts are off: ours replace them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    replies, sys.stdout = sys.stdout, sys.stderr  # a stray print must not corrupt the replies
    _equivalent_within_soft_timeout("1", "1")  # import and warm up before saying ready
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        gold, answer = json.loads(line)
        print("1" if _equivalent_within_soft_timeout(gold, answer) else "0", file=replies, flush=True)


if __name__ == "__main__":
    _serve()
