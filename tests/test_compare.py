"""The comparison command (benchmarks/compare.py): its statistics on known inputs, a tiny comparison end
to end with real trainer runs, stopping and starting again, and its one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.compare import METHODS, format_rate, mean_interval, paired_difference, parse_command_line
from benchmarks.compare import main as compare
from grpo_runs import ROOT, read_metrics

# Two steps of 2 prompts x 2 samples, 8 held-out problems (the tiny model solves about half) evaluated at every
# step, a checkpoint at every step.
TINY = ["--total-steps", "2", "--num-prompts", "2", "--group-size", "2", "--max-new-tokens", "64", "--eval-size", "8",
        "--eval-every", "1", "--save-every", "1"]


def run_compare(*argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.compare", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def run_dirs(out):
    """{(method, seed): the trainer's run folder} of a comparison folder."""
    return {(method.name, int(run.name.rsplit("__", 2)[1])): run
            for method in (out / "runs").iterdir() for run in method.iterdir() if run.is_dir()}


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    """tempo against grpo (added as the baseline), seeds 1 and 2, two trainers at a time."""
    out = tmp_path_factory.mktemp("comparison")
    result = run_compare("--methods", "tempo", "--seeds", "1,2", "--jobs", "2", "--out", str(out), "--", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def format_interval(results):
    return f"{results['pass@1']:.3f} [{results['pass@1_low']:.3f}, {results['pass@1_high']:.3f}]"


def test_tiny_comparison_runs_every_method_and_seed_and_reports_from_their_logs(tiny_comparison):
    out, stdout = tiny_comparison
    runs = run_dirs(out)
    assert set(runs) == {("grpo", 1), ("grpo", 2), ("tempo", 1), ("tempo", 2)}
    for (method, seed), run_dir in runs.items():
        assert f"] {method} seed {seed}: step 2/2" in stdout  # its progress line at the end
        saved = json.loads((run_dir / "args.json").read_text())
        assert (saved["seed"], saved["total_steps"], saved["eval_size"]) == (seed, 2, 8)
    assert json.loads((out / "settings.json").read_text()) == {"trainer_flags": TINY}
    results, paired = (out / "results.md").read_text(), (out / "paired.md").read_text()
    for (method, seed), run_dir in runs.items():
        lines = read_metrics(run_dir)
        before, after = lines[0]["eval"]["arithmetic"], lines[-1]["eval"]["arithmetic"]
        assert 0 < before["pass@1"] < 1  # so the intervals below are not the trivial ones of 0/n
        assert f"| {method} | {seed} | 2 | {format_interval(before)} | {format_interval(after)} |" in results
    for method in ("grpo", "tempo"):  # the mean over seeds, with its t-interval
        after = [read_metrics(runs[method, seed])[-1]["eval"]["arithmetic"]["pass@1"] for seed in (1, 2)]
        assert f"| {format_rate(*mean_interval(after))} |" in results.split(f"\n| {method} |")[1].split("\n")[0]
    grpo_after = [read_metrics(runs["grpo", seed])[-1]["eval"]["arithmetic"]["greedy_correct"] for seed in (1, 2)]
    tempo_after = [read_metrics(runs["tempo", seed])[-1]["eval"]["arithmetic"]["greedy_correct"] for seed in (1, 2)]
    only_tempo = sum(t == "1" and g == "0" for ts, gs in zip(tempo_after, grpo_after) for t, g in zip(ts, gs))
    only_grpo = sum(t == "0" and g == "1" for ts, gs in zip(tempo_after, grpo_after) for t, g in zip(ts, gs))
    assert f"| tempo | 1, 2 | {100 * (only_tempo - only_grpo) / 16:+.1f} |" in paired
    assert paired.split("| tempo |")[1].split("\n")[0].endswith(f"| {only_tempo} | {only_grpo} |")
    assert "How it is computed" in paired
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_started_again_it_skips_finished_runs_and_resumes_or_restarts_unfinished_ones(tiny_comparison, tmp_path,
                                                                                       capsys, monkeypatch):
    original, _ = tiny_comparison
    out = tmp_path / "comparison"
    shutil.copytree(original, out)
    runs = run_dirs(out)
    untouched = {path: path.read_bytes() for run in (("grpo", 1), ("tempo", 2))
                 for path in (runs[run] / "metrics.jsonl", runs[run].parent / f"seed_{run[1]}.log")}
    expected = {run: read_metrics(runs[run]) for run in (("grpo", 2), ("tempo", 1))}
    # grpo seed 2 was stopped after its step-1 checkpoint; tempo seed 1 before its first checkpoint.
    shutil.rmtree(runs["grpo", 2] / "checkpoints" / "step_2")
    shutil.rmtree(runs["tempo", 1] / "checkpoints")
    for run in expected:
        (runs[run] / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in expected[run][:2]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    compare(["--methods", "tempo", "--seeds", "1,2", "--jobs", "2", "--out", str(out), "--", *TINY])
    stdout = capsys.readouterr().out
    assert "4 runs, 2 of them complete already" in stdout
    assert "[2/4] grpo seed 2: resuming from step 1" in stdout
    assert "[3/4] tempo seed 1: restarting, it stopped before its first checkpoint" in stdout
    assert {path: path.read_bytes() for path in untouched} == untouched, "a finished run was run again"
    for run, lines in expected.items():  # the same runs as the uninterrupted ones, step for step
        got = read_metrics(run_dirs(out)[run])
        assert [line["step"] for line in got] == [0, 1, 2]
        for ours, theirs in zip(got, lines):
            assert ours["eval"] == theirs["eval"] and ours.get("reward_mean") == theirs.get("reward_mean")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "grpo,rloo"], "--methods: unknown method 'rloo'; choose from grpo, hicra,"),
    (["--methods", "grpo,grpo"], "--methods names a method twice"),
    (["--seeds", "1,two"], "--seeds must be comma-separated whole numbers such as 1,2,3 (got '1,two')"),
    (["--seeds", "1,1"], "--seeds names a seed twice"),
    (["--jobs", "0"], "--jobs must be positive (got 0)"),
    (["--", "--seed", "3"], "--seed is set by the comparison for each run"),
    (["--", "--runs-dir=elsewhere"], "--runs-dir is set by the comparison for each run"),
    (["--methods", "grpo,tempo", "--", "--td-coef", "0.5"],
     "the flags after -- do not suit grpo.py: unrecognized arguments: --td-coef 0.5"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        compare(["--out", str(out), *argv])
    text = str(stop.value.code)
    assert text.startswith("benchmarks.compare: error: ") and message in text and "\n" not in text, text
    assert not out.exists()


def test_a_failed_run_stops_the_comparison_with_its_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:  # a value only the trainer's own start-up check refuses
        compare(["--methods", "grpo", "--seeds", "1,2", "--out", str(out), "--", "--group-size", "1"])
    text = str(stop.value.code)
    assert text.startswith("benchmarks.compare: error: grpo seed 1 failed (exit 1): grpo.py: error: --group-size must "
                           "be at least 2") and text.endswith(f"(its output: {out / 'runs' / 'grpo' / 'seed_1.log'})")
    assert "\n" not in text and not (out / "runs" / "grpo" / "seed_2.log").exists(), "no run starts after a failure"


def test_a_folder_of_other_settings_or_no_comparison_is_refused_and_left_alone(tiny_comparison, tmp_path):
    out, _ = tiny_comparison
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as stop:
        compare(["--methods", "tempo", "--seeds", "1,2", "--out", str(out), "--", *TINY[:-2]])
    message = f"{out} holds runs made with other trainer flags ({' '.join(TINY)}); give another --out"
    assert message in str(stop.value.code)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        compare(["--out", str(tmp_path)])
    assert "is not empty and holds no comparison (no settings.json)" in str(stop.value.code)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_the_command_line_error_reaches_the_terminal_as_one_line():
    result = run_compare("--methods", "nope")
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"benchmarks.compare: error: --methods: unknown method 'nope'; choose from {', '.join(METHODS)}"]


def test_each_tasks_baseline_joins_the_methods():
    argv = ["--methods", "gigpo,tempo", "--seeds", "3,1", "--", "--eval-size", "5"]
    _, methods, seeds, flags = parse_command_line(argv)
    assert methods == ["grpo", "gigpo-omega0", "gigpo", "tempo"] and seeds == [3, 1] and flags == ["--eval-size", "5"]
    omega0 = METHODS["gigpo-omega0"]
    assert omega0.script == "gigpo.py" and omega0.flags == ("--step-advantage-weight", "0")


def test_paired_difference_on_hand_computed_cases():
    # One seed, d = (0, 1, 0, 0): a resample's mean is (ones drawn) / 4 with ones ~ Binomial(4, 1/4).
    # P(0 ones) = 0.316 > 2.5%, so the low end is 0; P(4 ones) = 0.4% < 2.5% < P(3 or 4) = 5.1%, so the
    # high end is 0.75.
    assert paired_difference([[1, 1, 0, 1]], [[1, 0, 0, 1]]) == pytest.approx((0.25, 0.0, 0.75))
    # Two seeds whose differences are 1 and 0 on every problem: a resample's mean is 1, 0.5 or 0 with
    # chances 1/4, 1/2, 1/4, whatever problems it draws.
    assert paired_difference([[1, 1, 1], [0, 1, 0]], [[0, 0, 0], [0, 1, 0]]) == pytest.approx((0.5, 0.0, 1.0))
    same = np.array([[1, 0, 1, 1, 0]])
    assert paired_difference(same, same) == (0.0, 0.0, 0.0)
    assert paired_difference([[0, 0, 1]], [[1, 1, 1]]) == pytest.approx((-2 / 3, -1.0, 0.0))  # 0 twice in 3: high end 0


def test_mean_over_seeds_carries_a_t_interval():
    # mean 2, s = 1, n = 3: 2 -+ t_{0.975, 2} / sqrt(3) = 2 -+ 4.303 / 1.732
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (low, high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert mean_interval([0.4]) == (0.4, None, None)
