"""Methods side by side: every trainer on the same task with the same seeds, compared with 95% intervals.

    python -m benchmarks.compare --methods grpo,hicra,prime,pure,tempo --seeds 1,2,3 --jobs 1
    python -m benchmarks.compare --methods gigpo --seeds 1,2,3 --out runs/agents      # the agent task
    python -m benchmarks.compare --methods grpo,tempo --seeds 1,2 -- --total-steps 40 --save-every 10

Each method's trainer runs once per seed; the flags after `--` go to every run. Into --out it writes

    results.md   per method: held-out greedy pass@1 before and after training (mean over seeds with a
                 95% t-interval), the gain, time per step and wall time; then each run with its own
                 95% Wilson interval (logged by common/evaluation.py)
    paired.md    each method against its task's baseline (grpo.py; for gigpo.py, the same trainer with
                 --step-advantage-weight 0) on the same held-out problems and seeds, with a bootstrap interval
    curves.png   held-out accuracy against step and against training time, a line per method (mean over
                 seeds) in the band the seeds span
    runs/        the trainers' run folders (runs/<method>/) and their output (runs/<method>/seed_<seed>.log)

Everything is read back from the runs' metrics.jsonl. The same command, stopped and started again,
skips the finished runs and continues an unfinished one from its last checkpoint (the trainers write
one only at the end unless given --save-every N), or restarts it when it has none. A folder keeps the
trainer flags it was made with; another set of flags needs another --out.
"""

import importlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UsageError
from common.cli import arg, parse_args
from common.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    script: str  # the trainer, in the project's root
    task: str  # methods are compared within a task: the same held-out problems, the same baseline
    flags: tuple[str, ...] = ()  # given to the trainer before the shared flags


METHODS = {
    "grpo": Method("grpo.py", "math"),
    "hicra": Method("hicra.py", "math"),
    "prime": Method("prime.py", "math"),
    "pure": Method("pure.py", "math"),
    "tempo": Method("tempo.py", "math"),
    "gigpo": Method("gigpo.py", "agent"),
    # omega = 0 leaves GiGPO's episode-level advantage alone, which is GRPO over whole episodes (GiGPO
    # paper, eq. 8): the same trainer, environments and evaluation, without the step-level credit.
    "gigpo-omega0": Method("gigpo.py", "agent", ("--step-advantage-weight", "0")),
}
BASELINES = {"math": "grpo", "agent": "gigpo-omega0"}  # each task's baseline; it is always run
TASK_TITLES = {"math": "held-out greedy pass@1", "agent": "held-out greedy success rate"}
TASK_ITEMS = {"math": "problems", "agent": "tasks"}  # what a held-out set holds
OWN_FLAGS = ("--seed", "--runs-dir", "--resume", "--eval-only")  # set by this script, run by run
PROGRESS_EVERY = 30.0  # seconds between two progress lines of a run
POLL = 0.5  # seconds between two looks at the running trainers
BOOTSTRAP_RESAMPLES = 10_000
REPORTS = ("results.md", "paired.md", "curves.png")
# t_{0.975, df} for df = 1..30, the two-sided 95% quantiles of Student's t (any statistics table).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class Args:
    methods: str = arg("grpo,hicra,prime,pure,tempo", f"comma-separated, from {', '.join(METHODS)}; baselines added")
    seeds: str = arg("1,2,3", "comma-separated seeds; every method runs with each")
    jobs: int = arg(1, "trainers running at once (1: one after another, as timed)", min=1)
    out: str = arg("runs/comparison", "output folder; its runs/ holds the trainers' runs")


# Statistics.
def mean_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean and 95% t-interval over seeds, mean -+ t_{0.975, n-1} s / sqrt(n) (s with Bessel's
    correction); no interval from one seed. Past 30 seeds it keeps t_{0.975, 30}, a little wide."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    half_width = T_975[min(len(values) - 1, len(T_975)) - 1] * float(np.std(values, ddof=1)) / np.sqrt(len(values))
    return mean, mean - half_width, mean + half_width


def paired_difference(method_correct, baseline_correct, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
    """Mean paired difference of two methods' greedy correctness and its 95% percentile bootstrap interval.

    `method_correct`, `baseline_correct`: 0/1 [seeds, problems]; row s of both comes from the runs
    with the same seed, column j is the same held-out problem. The difference d = method - baseline
    is 1, 0 or -1 per problem and seed; the estimate is its mean. A resample draws the seeds with
    replacement and, independently, the problems with replacement (one draw of problems for all
    seeds, as they share them), and takes the mean of d over the drawn cells: the interval covers
    both the luck of the seeds and that of the problems. Returns (mean, low, high).
    """
    differences = np.asarray(method_correct, dtype=float) - np.asarray(baseline_correct, dtype=float)  # [S, N]
    num_seeds, num_problems = differences.shape
    rng = np.random.default_rng(seed)
    # How often each seed and each problem was drawn, as weights: the resample's mean without building it.
    seed_weights = rng.multinomial(num_seeds, np.full(num_seeds, 1 / num_seeds), resamples) / num_seeds
    problem_weights = rng.multinomial(num_problems, np.full(num_problems, 1 / num_problems), resamples) / num_problems
    resampled = ((seed_weights @ differences) * problem_weights).sum(axis=1)  # [resamples]
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)


def find_method(name: str) -> Method:
    """One of METHODS, or a trainer of your own in the project's root, `<name>.py` (a copy of grpo.py with
    another estimator: README, "Adding a method"), compared on the math task against grpo.py."""
    if name in METHODS:
        return METHODS[name]
    if (ROOT / f"{name}.py").is_file():
        return Method(f"{name}.py", "math")
    raise UsageError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)} or a trainer "
                     "<name>.py of your own beside grpo.py")


# The command line.
def parse_command_line(argv: list[str]) -> tuple[Args, list[str], list[int], list[str]]:
    """(args, methods, seeds, trainer flags) from `argv`; the trainer flags are those after `--`."""
    split = argv.index("--") if "--" in argv else len(argv)
    args, trainer_flags = parse_args(Args, argv[:split], __doc__), argv[split + 1:]
    methods = [name.strip() for name in args.methods.split(",")]
    for name in methods:
        find_method(name)
    if len(set(methods)) < len(methods):
        raise UsageError(f"--methods names a method twice: {args.methods}")
    for task in dict.fromkeys(find_method(name).task for name in methods):
        if BASELINES[task] not in methods:  # paired.md compares with it
            methods.insert(0, BASELINES[task])
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated whole numbers such as 1,2,3 (got {args.seeds!r})") from None
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds names a seed twice: {args.seeds}")
    for flag in trainer_flags:
        if flag.split("=")[0] in OWN_FLAGS:
            raise UsageError(f"{flag.split('=')[0]} is set by the comparison for each run; "
                             f"leave it out of the flags after --")
    for script in dict.fromkeys(find_method(name).script for name in methods):  # fail now, not hours in
        try:
            parse_args(importlib.import_module(Path(script).stem).Args, list(trainer_flags))
        except UsageError as error:
            raise UsageError(f"the flags after -- do not suit {script}: {error}") from None
    return args, methods, seeds, trainer_flags


def claim_output_folder(out: Path, trainer_flags: list[str]):
    """Make `out` a comparison folder of these trainer flags, or stop if its runs were made with others."""
    settings_file = out / "settings.json"
    settings = {"trainer_flags": trainer_flags}
    has_runs = any((out / "runs").glob("*/*/metrics.jsonl"))
    if settings_file.is_file():
        saved = json.loads(settings_file.read_text())
        if saved != settings and has_runs:
            made_with = " ".join(saved["trainer_flags"]) or "none"
            raise UsageError(f"{out} holds runs made with other trainer flags ({made_with}); "
                             f"give another --out, or the same flags after --")
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no comparison (no settings.json); give another --out")
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=1))


# Runs: where each one lives, how far it got, and running them.
def read_metrics(run_dir: Path) -> list[dict]:
    """The complete lines of a run's metrics.jsonl (a line being written has no newline yet)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


@dataclass
class Run:
    method: str
    seed: int
    folder: Path  # the trainer's --runs-dir: <out>/runs/<method>

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"

    @property
    def log(self) -> Path:
        return self.folder / f"seed_{self.seed}.log"

    def run_dir(self) -> Path | None:
        """The trainer's run folder ({task}__{method}__{seed}__{time}) of this seed, once it exists."""
        found = [path for path in self.folder.glob("*__*__*__*") if path.name.rsplit("__", 2)[1] == str(self.seed)]
        if len(found) > 1:
            raise UsageError(f"{self.folder} holds {len(found)} runs of seed {self.seed}; remove all but one")
        return found[0] if found else None

    def progress(self) -> tuple[int, int]:
        """(last step logged, total steps); (-1, 0) before the trainer has written its arguments."""
        run_dir = self.run_dir()
        if run_dir is None or not (run_dir / "args.json").is_file():
            return -1, 0
        lines = read_metrics(run_dir)
        return (lines[-1]["step"] if lines else -1), json.loads((run_dir / "args.json").read_text())["total_steps"]

    def is_complete(self) -> bool:
        step, total = self.progress()
        return step == total


@dataclass
class Job:
    """A trainer process at work on a run."""
    run: Run
    position: str  # "3/15": the run's place in the comparison
    process: subprocess.Popen
    started: float
    first_step: int  # the step it started from
    reported: float = 0.0  # when its last progress line was printed


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def start(run: Run, position: str, trainer_flags: list[str]) -> Job:
    """Start the trainer on `run`: resumed from its last checkpoint if it has one, else from the start."""
    run.folder.mkdir(parents=True, exist_ok=True)
    run_dir = run.run_dir()
    try:
        checkpoint = latest_checkpoint(run_dir) if run_dir else None
    except UsageError:  # stopped before its first checkpoint: nothing to continue from
        print(f"[{position}] {run.name}: restarting, it stopped before its first checkpoint "
              f"(--save-every N after -- makes the trainers write some)", flush=True)
        shutil.rmtree(run_dir)
        checkpoint = None
    method = find_method(run.method)
    if checkpoint:
        command, first_step = ["--resume", str(run_dir)], int(checkpoint.name.removeprefix("step_"))
        print(f"[{position}] {run.name}: resuming from step {first_step}", flush=True)
    else:
        command, first_step = ["--seed", str(run.seed), "--runs-dir", str(run.folder), *method.flags, *trainer_flags], 0
    with run.log.open("a") as log:  # the trainer's own output; the screen gets progress lines
        log.write(f"$ python {method.script} {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen([sys.executable, method.script, *command], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    return Job(run, position, process, time.time(), first_step)


def report(job: Job):
    """One progress line: method, seed, step, and the time left at this attempt's pace so far."""
    step, total = job.run.progress()
    elapsed = time.time() - job.started
    done = step - job.first_step
    if job.process.poll() is not None:
        eta = "finished"
    else:
        eta = f"eta {format_duration(elapsed / done * (total - step))}" if done > 0 else "eta after its first step"
    where = f"step {step}/{total}" if step >= 0 else "starting"
    print(f"[{job.position}] {job.run.name}: {where}, {format_duration(elapsed)}, {eta}", flush=True)
    job.reported = time.time()


def run_all(runs: list[Run], trainer_flags: list[str], jobs: int, wall_times_file: Path):
    """Run every unfinished run, `jobs` at a time, with progress lines; wall times go to `wall_times_file`.

    After a failure no new run starts; the running ones finish, then the failure is raised.
    """
    wall_times = json.loads(wall_times_file.read_text()) if wall_times_file.is_file() else {}
    pending = [(f"{number}/{len(runs)}", run) for number, run in enumerate(runs, 1) if not run.is_complete()]
    print(f"{len(runs)} runs, {len(runs) - len(pending)} of them complete already", flush=True)
    running, failures = [], []
    while running or (pending and not failures):
        while pending and len(running) < jobs and not failures:
            position, run = pending.pop(0)
            running.append(start(run, position, trainer_flags))
        time.sleep(POLL)
        for job in list(running):
            if job.process.poll() is None:
                if time.time() - job.reported >= PROGRESS_EVERY:
                    report(job)
                continue
            running.remove(job)
            if job.process.returncode != 0 or not job.run.is_complete():
                lines = [line for line in job.run.log.read_text().splitlines() if line.strip()]
                failures.append(f"{job.run.name} failed (exit {job.process.returncode}): {lines[-1] if lines else ''} "
                                f"(its output: {job.run.log})")
                continue
            key = f"{job.run.method}/{job.run.seed}"  # summed over the attempts of a run that was stopped
            wall_times[key] = wall_times.get(key, 0.0) + time.time() - job.started
            wall_times_file.write_text(json.dumps(wall_times, indent=1))
            report(job)
    if failures:
        raise UsageError("; ".join(failures))


# Reading the results back.
@dataclass
class RunResult:
    method: str
    seed: int
    eval_set: str  # the first held-out set, the one compared
    before: dict  # its evaluation at step 0: pass@1, pass@1_low, pass@1_high, greedy_correct
    after: dict  # its last evaluation
    steps: int
    curve: list[tuple[int, float, float]]  # (step, training seconds so far, pass@1) of every evaluation
    time_per_step: float
    wall_time: float | None  # the trainer processes' seconds, start-up and evaluations included


def read_result(run: Run, wall_times: dict) -> RunResult:
    run_dir = run.run_dir()
    lines = read_metrics(run_dir)
    if lines[0]["step"] != 0:
        raise UsageError(f"{run_dir} has no evaluation before its first update (a trainer older than this "
                         f"comparison made it); remove it to run it again")
    eval_set = next(iter(lines[0]["eval"]))
    curve, training_seconds = [], 0.0
    for line in lines:
        training_seconds += line.get("time_step", 0.0)
        if line["eval"] is not None:
            curve.append((line["step"], training_seconds, line["eval"][eval_set]["pass@1"]))
    evaluations = [line["eval"][eval_set] for line in lines if line["eval"] is not None]
    return RunResult(run.method, run.seed, eval_set, evaluations[0], evaluations[-1], lines[-1]["step"], curve,
                     training_seconds / (len(lines) - 1), wall_times.get(f"{run.method}/{run.seed}"))


# Reports.
def format_rate(mean: float, low: float | None, high: float | None) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{mean:.3f}"


def format_points(mean: float, low: float | None, high: float | None) -> str:
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]" if low is not None else f"{100 * mean:+.1f}"


def results_table(task: str, results: list[RunResult], trainer_flags: list[str]) -> str:
    methods = list(dict.fromkeys(result.method for result in results))
    first = results[0]
    lines = [f"## {task.capitalize()} task: {TASK_TITLES[task]}", "",
             f"Held-out set `{first.eval_set}`, {len(first.after['greedy_correct'])} {TASK_ITEMS[task]}; seeds "
             f"{', '.join(str(s) for s in sorted({r.seed for r in results}))}; trainer flags: "
             f"`{' '.join(trainer_flags) or '(defaults)'}`. Before and after: mean over seeds [95% t-interval over "
             f"seeds]; gain in points, the same way; time per step without evaluations, wall time with them and "
             f"start-up (mean over seeds).", "",
             "| method | before | after | gain (points) | time per step | wall time |", "|---|---|---|---|---|---|"]
    for method in methods:
        runs = [r for r in results if r.method == method]
        walls = [r.wall_time for r in runs if r.wall_time is not None]
        lines.append(f"| {method} | {format_rate(*mean_interval([r.before['pass@1'] for r in runs]))} "
                     f"| {format_rate(*mean_interval([r.after['pass@1'] for r in runs]))} "
                     f"| {format_points(*mean_interval([r.after['pass@1'] - r.before['pass@1'] for r in runs]))} "
                     f"| {np.mean([r.time_per_step for r in runs]):.2f}s "
                     f"| {format_duration(np.mean(walls)) if len(walls) == len(runs) else 'not recorded'} |")
    lines += ["", f"Each run, with its own 95% Wilson interval over the held-out {TASK_ITEMS[task]}:", "",
              "| method | seed | steps | before | after | time per step | wall time |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.method} | {r.seed} | {r.steps} "
                     f"| {format_rate(r.before['pass@1'], r.before['pass@1_low'], r.before['pass@1_high'])} "
                     f"| {format_rate(r.after['pass@1'], r.after['pass@1_low'], r.after['pass@1_high'])} "
                     f"| {r.time_per_step:.2f}s | {format_duration(r.wall_time) if r.wall_time else 'not recorded'} |")
    return "\n".join(lines)


def paired_table(task: str, results: list[RunResult]) -> str:
    baseline = BASELINES[task]
    by_run = {(r.method, r.seed): r for r in results}
    lines = [f"## {task.capitalize()} task: against {baseline}", "",
             "| method | seeds | difference (points) | 95% bootstrap interval | solved only by the method "
             f"| solved only by {baseline} |", "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r.method for r in results if r.method != baseline):
        seeds = sorted(seed for m, seed in by_run if m == method and (baseline, seed) in by_run)
        pairs = [(by_run[method, seed].after, by_run[baseline, seed].after) for seed in seeds]
        if any(len(ours["greedy_correct"]) != len(theirs["greedy_correct"]) for ours, theirs in pairs):
            raise UsageError(f"{method} and {baseline} were evaluated on different held-out problems; "
                             f"they cannot be paired")
        ours = np.array([[int(c) for c in pair[0]["greedy_correct"]] for pair in pairs])
        theirs = np.array([[int(c) for c in pair[1]["greedy_correct"]] for pair in pairs])
        mean, low, high = paired_difference(ours, theirs)
        lines.append(f"| {method} | {', '.join(map(str, seeds))} | {100 * mean:+.1f} "
                     f"| [{100 * low:+.1f}, {100 * high:+.1f}] "
                     f"| {int(((ours == 1) & (theirs == 0)).sum())} | {int(((ours == 0) & (theirs == 1)).sum())} |")
    return "\n".join(lines)


PAIRED_METHOD = f"""How it is computed: for every seed, the method's run and the baseline's run with that seed
answered the same held-out problems at the end of training (greedy, the last evaluation; each
problem's correctness is in the runs' metrics.jsonl, `greedy_correct`). Per problem and seed the
difference is 1 (only the method solved it), -1 (only the baseline) or 0; the table gives its mean
over problems and seeds, in points of pass@1. The 95% interval is a percentile bootstrap with
{BOOTSTRAP_RESAMPLES:,} resamples, each drawing the seeds with replacement and, independently, the problems
with replacement (the same problems for every seed), so it covers the luck of both. Pairing removes
the spread of problem difficulty that two unpaired accuracies carry, so it is the test of "A beats B"
on shared problems; an interval that holds 0 does not show a difference. The last two columns count
the (problem, seed) cells solved by one run of the pair only.

The baseline of the math task is grpo.py. The agent task's is gigpo.py with --step-advantage-weight 0:
omega = 0 leaves only GiGPO's episode-level advantage, which is GRPO over whole episodes (GiGPO paper,
eq. 8), so the pair differs only in the step-level credit; grpo.py itself cannot play the environments."""


def plot_curves(pyplot, results_by_task: dict[str, list[RunResult]], path: Path):
    """Held-out accuracy against step and against training time: a line per method, the mean over
    seeds, in the band from the lowest seed to the highest."""
    figure, axes = pyplot.subplots(len(results_by_task), 2, figsize=(12, 4.5 * len(results_by_task)), squeeze=False)
    for (step_axis, time_axis), (task, results) in zip(axes, results_by_task.items()):
        for method in dict.fromkeys(r.method for r in results):
            curves = [r.curve for r in results if r.method == method]
            evaluated = sorted(set.intersection(*({step for step, _, _ in curve} for curve in curves)))
            # [seeds, evaluations, (training seconds, accuracy)]
            points = np.array([[point[1:] for point in curve if point[0] in evaluated] for curve in curves])
            seconds, accuracy = points[..., 0].mean(axis=0), points[..., 1]
            for axis, x in ((step_axis, evaluated), (time_axis, seconds)):
                line, = axis.plot(x, accuracy.mean(axis=0), marker="o", markersize=3, label=method)
                axis.fill_between(x, accuracy.min(axis=0), accuracy.max(axis=0), color=line.get_color(), alpha=0.2)
        step_axis.set(xlabel="step", ylabel=TASK_TITLES[task], title=f"{task} task: against step")
        time_axis.set(xlabel="training time (s, mean over seeds; evaluations excluded)", ylabel=TASK_TITLES[task],
                      title=f"{task} task: against training time")
        step_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("curves.png needs matplotlib: pip install -r requirements-compare.txt") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot

    return matplotlib.pyplot


def write_reports(out: Path, runs: list[Run], trainer_flags: list[str], pyplot):
    wall_times_file = out / "wall_times.json"
    wall_times = json.loads(wall_times_file.read_text()) if wall_times_file.is_file() else {}
    results_by_task = {}
    for run in runs:
        results_by_task.setdefault(find_method(run.method).task, []).append(read_result(run, wall_times))
    (out / "results.md").write_text("# Comparison\n\n" + "\n\n".join(
        results_table(task, results, trainer_flags) for task, results in results_by_task.items()) + "\n")
    (out / "paired.md").write_text("# Paired differences at the end of training\n\n" + "\n\n".join(
        paired_table(task, results) for task, results in results_by_task.items()) + "\n\n" + PAIRED_METHOD + "\n")
    plot_curves(pyplot, results_by_task, out / "curves.png")


def main(argv: list[str] | None = None):
    try:
        args, methods, seeds, trainer_flags = parse_command_line(sys.argv[1:] if argv is None else argv)
        pyplot = import_pyplot()  # before hours of training, not after
        out = Path(args.out).resolve()  # the trainers run from the project's root
        claim_output_folder(out, trainer_flags)
        runs = [Run(method, seed, out / "runs" / method) for method in methods for seed in seeds]
        run_all(runs, trainer_flags, args.jobs, out / "wall_times.json")
        write_reports(out, runs, trainer_flags, pyplot)
    except UsageError as error:
        sys.exit(f"benchmarks.compare: error: {error}")
    print(f"\n{(out / 'results.md').read_text()}\nwritten: {', '.join(str(out / name) for name in REPORTS)}")


if __name__ == "__main__":
    main()
