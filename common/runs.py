"""Run folders: arguments, the metrics log (and an experiment tracker), checkpoints, the summary.

A run lives in `runs/{task}__{method}__{seed}__{timestamp}/`:

    args.json          the arguments, so that --resume can continue with them
    metrics.jsonl      one JSON line per step
    checkpoints/step_N the model (safetensors) and tokenizer, other models in subfolders, and
                       trainer_state.pt: optimizer, scheduler, RNG states and step; under torchrun
                       the optimizer states are in optimizers/ instead (torch.distributed.checkpoint:
                       one shard per rank), and the models' weights are gathered from their shards

Nothing here knows a method: a trainer passes in what it has. Under torchrun rank 0 alone writes the
log and the files; every rank takes part in a checkpoint.
"""

import dataclasses
import importlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from common import UsageError, distributed
from common.evaluation import format_pass_at_1

TRACKERS = ("trackio", "wandb")
OPTIMIZER_STATES = "optimizers"  # a checkpoint's folder of optimizer states written by every rank (torchrun)


def new_run_dir(runs_dir: str, task: str, method: str, seed: int) -> Path:
    """The name of a new run folder (not yet created), CleanRL style: {task}__{method}__{seed}__{time}."""
    return Path(runs_dir) / f"{task}__{method}__{seed}__{distributed.agree(int(time.time()))}"


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """Nested metrics as flat numeric ones for a tracker: {"eval": {"gsm8k": {"pass@1": x}}} ->
    {"eval/gsm8k/pass@1": x}. Values that are None (not measured this step) and text are left out."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + key] = value
    return flat


def import_tracker(name: str):
    """The experiment tracker's module, imported only when a run asks for one (--track)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise UsageError(f"--track needs {name}: pip install -r requirements-track.txt ({err})") from err


class RunLog:
    """args.json and metrics.jsonl of one run, and with a `tracker` module the same lines sent to it.

    Opening a run folder to resume at `resume_step` drops the lines logged after that step (the
    steps a killed run did after its last checkpoint), so the log reads as one uninterrupted run.
    The tracker (trackio: local files, offline; or wandb) names its run after the run folder.
    """

    def __init__(self, run_dir: Path, args, resume_step: int | None = None, tracker=None, project: str = "cleancredit"):
        self.run_dir, self.writes = run_dir, distributed.is_main()
        if not self.writes:  # under torchrun, ranks other than 0 log nothing
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / "metrics.jsonl"
        if resume_step is not None and metrics_path.is_file():
            lines = metrics_path.read_text().splitlines()
            metrics_path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= resume_step))
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        self.tracker = tracker
        if tracker is not None:
            config = dataclasses.asdict(args)
            if tracker.__name__ == "trackio":  # resume="allow": a resumed run logs on into its own tracker run
                tracker.init(project=project, name=run_dir.name, config=config, resume="allow",
                             auto_log_cpu=False, auto_log_gpu=False)
            else:
                tracker.init(project=project, name=run_dir.name, id=run_dir.name.replace("+", "-"), config=config,
                             resume="allow")
        self.file = metrics_path.open("a")

    def log(self, metrics: dict):
        if not self.writes:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tracker is not None:
            self.tracker.log(flatten_metrics({key: value for key, value in metrics.items() if key != "step"}),
                             step=metrics["step"])

    def close(self):
        if not self.writes:
            return
        self.file.close()
        if self.tracker is not None:
            self.tracker.finish()


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, state: dict, keep: int):
    """Write checkpoints/step_N atomically: build it under a temporary name, then rename it.

    `state` names everything else a resumed run needs. Models (anything with `save_pretrained`,
    such as a reward model being trained) go to step_N/<name>/ as safetensors and are reloaded from
    there with load_model; the rest (optimizers, schedulers) go through `state_dict()` into
    trainer_state.pt with the RNG states. A kill during the save leaves only the temporary folder,
    which resume ignores. The newest `keep` checkpoints are kept.
    """
    checkpoints = run_dir / "checkpoints"
    final, partial = checkpoints / f"step_{step}", checkpoints / f"partial_step_{step}"
    if distributed.is_distributed():
        return _save_checkpoint_of_ranks(checkpoints, final, partial, step, policy, tokenizer, state, keep)
    shutil.rmtree(partial, ignore_errors=True)
    policy.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    trainer_state = _random_states(step)
    for name, item in state.items():
        if hasattr(item, "save_pretrained"):
            item.save_pretrained(partial / name, safe_serialization=True)
        else:
            trainer_state[name] = item.state_dict()
    torch.save(trainer_state, partial / "trainer_state.pt")
    _publish(checkpoints, final, partial, keep)


def _random_states(step: int) -> dict:
    return {"step": step, "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _publish(checkpoints: Path, final: Path, partial: Path, keep: int):
    """The complete `partial` folder becomes `final` in one rename; then only the newest `keep` stay."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in sorted(checkpoints.glob("step_*"), key=lambda p: int(p.name[5:]))[:-keep]:
        shutil.rmtree(old)


def _save_checkpoint_of_ranks(checkpoints: Path, final: Path, partial: Path, step: int, policy, tokenizer, state: dict,
                              keep: int):
    """save_checkpoint under torchrun: the same folder, with the optimizer states in optimizers/.

    Each model's weights are gathered from their shards to rank 0, which writes them as safetensors
    (fp32 masters: resume is exact, and the folder is what from_pretrained and vLLM load, at any
    world size); every rank writes its shard of the optimizer states (torch.distributed.checkpoint),
    keyed by parameter names, so they load back re-sharded. Rank 0 writes the rest and publishes the
    folder once every rank has written.
    """
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier()
    models = _models(policy, state)
    for name, model in models.items():
        weights = distributed.full_state_dict(model)  # every rank takes part; rank 0 receives them
        if distributed.is_main():
            model.save_pretrained(partial / name, state_dict=weights, safe_serialization=True)
    distributed.save_optimizer_states(partial / OPTIMIZER_STATES, _optimizers_with_models(models, state))
    if distributed.is_main():
        tokenizer.save_pretrained(partial)
        others = {name: item.state_dict() for name, item in state.items()
                  if not hasattr(item, "save_pretrained") and not isinstance(item, torch.optim.Optimizer)}
        torch.save({**_random_states(step), **others}, partial / "trainer_state.pt")
    distributed.barrier()
    if distributed.is_main():
        _publish(checkpoints, final, partial, keep)
    distributed.barrier()


def _models(policy, state: dict) -> dict:
    """{folder name: model} of a checkpoint: the policy in the checkpoint's own folder, the others in subfolders."""
    return {"": policy, **{name: item for name, item in state.items() if hasattr(item, "save_pretrained")}}


def _optimizers_with_models(models: dict, state: dict) -> dict:
    """{name: (model, optimizer)} for every optimizer in `state`, each with the model whose parameters it updates."""
    owner = {id(parameter): model for model in models.values() for parameter in model.parameters()}
    return {name: (owner[id(item.param_groups[0]["params"][0])], item) for name, item in state.items()
            if isinstance(item, torch.optim.Optimizer)}


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run folder; a one-line UsageError if there is none."""
    found = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    if not found:
        raise UsageError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    return found[-1]


def restore_checkpoint(checkpoint: Path, policy, state: dict) -> int:
    """Load trainer_state.pt into the objects of `state` (as passed to save_checkpoint; models are
    skipped, the trainer loads them from their folders) and restore the RNG states. Returns the step.

    A checkpoint written under torchrun holds its optimizer states in optimizers/, which load into
    `policy`'s and the other models' optimizers at any number of ranks (plain python included).
    weights_only: a checkpoint is data, and unpickling arbitrary objects could run code.
    """
    trainer_state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    sharded_optimizers = (checkpoint / OPTIMIZER_STATES).is_dir()
    if sharded_optimizers:
        optimizers = _optimizers_with_models(_models(policy, state), state)
        distributed.load_optimizer_states(checkpoint / OPTIMIZER_STATES, optimizers)
    elif distributed.is_distributed():
        raise UsageError(f"--resume: {checkpoint} was written by plain python; resume it with python, not torchrun")
    for name, item in state.items():
        loaded = hasattr(item, "save_pretrained") or (sharded_optimizers and isinstance(item, torch.optim.Optimizer))
        if not loaded:
            item.load_state_dict(trainer_state[name])
    random.setstate(trainer_state["python_rng"])
    torch.set_rng_state(trainer_state["torch_rng"])
    if trainer_state["cuda_rng"]:
        torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
    return trainer_state["step"]


def trend(history: list[dict], key: str) -> str:
    """The mean of `key` over the first 10 steps -> over the last 10 (steps where it is None left out)."""
    first, last = ([m[key] for m in steps if m[key] is not None] for steps in (history[:10], history[-10:]))
    return (f"{sum(first) / max(len(first), 1):.3f} (first {len(first)} steps) -> "
            f"{sum(last) / max(len(last), 1):.3f} (last {len(last)})")


def print_summary(header: str, history: list[dict], batch_size: int, initial_eval: dict, final_eval: dict,
                  elapsed: float, run_dir: Path, method_lines: dict[str, str] | None = None):
    """One screen at the end of a run: greedy accuracy with its 95% interval before and after on the
    first held-out set (of the evaluations `initial_eval` and `final_eval`, {set: results}), reward
    trend, where the time went, then `method_lines` ({label: text}), a method's own lines."""
    def mean(key, steps):
        return sum(m[key] for m in steps) / max(len(steps), 1)
    synced = [m for m in history if m.get("time_sync") is not None]  # a vLLM engine's steps
    checked = [m for m in synced if m["sampler_logp_diff"] is not None]
    eval_name, initial = next(iter(initial_eval.items()))
    final = final_eval[eval_name]
    lines = {
        "held-out greedy accuracy": f"{format_pass_at_1(initial)} -> {format_pass_at_1(final)} "
                                    f"({100 * (final['pass@1'] - initial['pass@1']):+.1f} points on {eval_name}; "
                                    f"95% Wilson intervals)",
        "sampled reward": trend(history, "reward_mean"),
        "response length": f"{mean('response_length', history):.1f} tokens, {100 * mean('truncated_fraction', history):.1f}% truncated",
        "zero-advantage sequences": f"{100 * mean('skipped_sequences', history) / batch_size:.1f}% (skipped in training)",
        "time per step": f"{mean('time_step', history):.2f}s: generate {mean('time_generate', history):.2f}s, "
                         f"score {mean('time_score', history):.3f}s, train {mean('time_train', history):.2f}s"
                         + (f", vLLM weight sync {mean('time_sync', synced):.3f}s" if synced else ""),
        **({"vLLM log-probs vs trainer": f"{mean('sampler_logp_diff', checked):.2g} nats per token on average, at most "
                                         f"{max(m['sampler_logp_diff'] for m in checked):.2g}"} if checked else {}),
        **(method_lines or {}),
        "wall time": f"{elapsed:.0f}s with evaluations",
        "run folder": str(run_dir),
    }
    print(f"\n{'=' * 72}\n{header}, steps {history[0]['step'] - 1}-{history[-1]['step']}")
    for label, text in lines.items():
        print(f"  {label:<26} {text}")
    print("=" * 72)
