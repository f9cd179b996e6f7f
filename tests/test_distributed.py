"""Many processes (torchrun, FSDP2, gloo on the CPU) give the single-process update, and runs under
torchrun sample without deadlock, checkpoint, resume exactly, and stop together when one rank fails.

The ranks' results are compared with one plain-python process on the same global batch: gradients
(before clipping) as well as parameters, since AdamW hides a gradient that is off by a constant
factor (the factor-2 bug of averaging instead of summing moved the parameters by only 1.8e-4).
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import distributed_checks
from common import distributed
from common.build_tiny import build_tokenizer
from common.data import render_prompt
from common.model import load_model
from common.rollout import generate
from grpo_runs import ROOT, read_metrics, run_trainer, sampled_tiny_batch

SHORT_TIMEOUT = {distributed.TIMEOUT_VARIABLE: "60"}  # a deadlock fails in a minute, not after 30


def torchrun(processes: int | None, *command, timeout=240, env=None):
    """`torchrun --standalone --nproc-per-node N <command>` from the project root, offline, one thread per
    rank; with `processes` None, `python <command>` in the same environment (the single-process reference)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **SHORT_TIMEOUT, **(env or {})}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes else []
    return subprocess.run([sys.executable, *launcher, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_ran(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


# The single-process identities: plain python runs none of the distributed code.
def test_without_torchrun_every_helper_is_the_single_process_identity():
    rows = torch.tensor([5, 0, 3, 7, 1])
    assert distributed.start("cpu") == "cpu" and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert [batch.tolist() for batch in distributed.micro_batches(rows, 2)] == [[5, 0], [3, 7], [1]]
    assert distributed.share(rows) is rows and distributed.row_block(5) == slice(0, 5)
    values = torch.randn(5, 3)
    assert distributed.gather_rows(values, rows) is values and distributed.merge_rows(values, rows) is values
    assert distributed.sum_over_ranks({"loss": 1.5}) == {"loss": 1.5} and distributed.agree(7) == 7


# 1 process against 2 on the same global batch: grpo.py's update_policy, 3 steps per configuration.
@pytest.fixture(scope="module")
def checks_folder(tmp_path_factory):
    """distributed_checks.py's parity in plain python, on 1 and on 2 processes (those also generate)."""
    folder = tmp_path_factory.mktemp("checks")
    _, batch = sampled_tiny_batch()
    batch["advantages"] = torch.randn(8, 1, generator=torch.Generator().manual_seed(3)) * batch["mask"]
    torch.save(batch, folder / "batch.pt")
    for processes, checks in ((None, ["parity"]), (1, ["parity"]), (2, ["parity", "generate"])):
        check_ran(torchrun(processes, "tests/distributed_checks.py", str(folder), *checks))
    return folder


@pytest.fixture(scope="module")
def parity_results(checks_folder):
    return {name: torch.load(checks_folder / f"parity-{processes}.pt", weights_only=False)
            for name, processes in (("plain", "plain"), ("one", 1), ("two", 2))}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    flat_a, flat_b = (torch.cat([tensors[name].flatten() for name in a]) for tensors in (a, b))
    return (flat_a - flat_b).abs().max().item()


def same_nans_and_values(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> bool:
    """Per-token outputs [B, C]: NaN on the same rows (pi_old of rows no pass computed), the same values elsewhere."""
    return torch.equal(a.isnan(), b.isnan()) and torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=0.0, atol=atol)


@pytest.mark.parametrize("config", [*distributed_checks.PARITY_CONFIGS, *distributed_checks.PRIME_CONFIGS])
def test_two_processes_give_the_single_process_gradients_and_parameters(parity_results, config):
    plain, one, two = (parity_results[name][config] for name in ("plain", "one", "two"))
    assert len(plain["gradients"]) == len(one["gradients"]) == len(two["gradients"]) > 0
    # One process under torchrun (FSDP2 of one rank) is plain python, bit for bit.
    assert all(largest_difference(x, y) == 0.0 for x, y in zip(plain["gradients"], one["gradients"]))
    assert torch.equal(torch.stack(plain["norms"]), torch.stack(one["norms"]))
    assert largest_difference(plain["parameters"], one["parameters"]) == 0.0
    assert all(same_nans_and_values(x, y) for x, y in zip(plain["outputs"], one["outputs"]))
    # Two processes: equal up to float32 summation order, which grows over the steps (measured: at most
    # 1.1e-5 of the largest gradient, with the KL term over 12 steps). A share summed twice or not at all
    # would be off by about the gradient itself.
    scale = max(g.abs().max().item() for step in plain["gradients"] for g in step.values())
    assert scale > 1e-3
    for step_plain, step_two in zip(plain["gradients"], two["gradients"]):
        assert largest_difference(step_plain, step_two) <= 1e-4 * scale
    assert torch.allclose(torch.stack(plain["norms"]), torch.stack(two["norms"]), rtol=1e-4)
    assert largest_difference(plain["parameters"], two["parameters"]) <= 1e-5
    for metrics_plain, metrics_two in zip(plain["metrics"], two["metrics"]):
        for key, value in metrics_plain.items():
            assert metrics_two[key] == (value if value is None else pytest.approx(value, rel=1e-4, abs=1e-7)), key
    # pi_old of grpo.py's update; PRIME's advantages, whitened over the whole batch.
    assert all(same_nans_and_values(x, y, atol=1e-4) for x, y in zip(plain["outputs"], two["outputs"]))


def test_ranks_generating_different_lengths_do_not_deadlock(checks_folder):
    outputs = torch.load(checks_folder / "generate-2.pt", weights_only=False)
    tokenizer, policy = build_tokenizer(), load_model("tiny", "cpu")
    for rank, output in enumerate(outputs):
        prompt = render_prompt(tokenizer, output["question"], "chat")
        alone = generate(policy, tokenizer, [prompt], 4 + 36 * rank, greedy=True)
        assert output["tokens"] == alone.completion_ids[0].tolist()  # the sharded model's tokens are the model's
    assert len(outputs[1]["tokens"]) == 40 > len(outputs[0]["tokens"])


def failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error: rank 1 stops here on purpose" in line]


def test_a_failing_rank_stops_every_rank_within_seconds():
    # Rank 0 would sleep ten minutes and then wait in a collective for the 30-minute default timeout.
    started = time.time()
    result = torchrun(2, "tests/distributed_checks.py", "-", "fail", env={distributed.TIMEOUT_VARIABLE: "1800"})
    assert result.returncode != 0 and time.time() - started < 120
    assert len(failure_lines(result.stderr)) == 1, result.stderr[-3000:]


def test_a_failing_rank_on_another_node_stops_this_one_within_seconds():
    # Two ranks started without torchrun, as two nodes' processes are: no common agent stops them,
    # only the watcher on the rendezvous store does.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", distributed.TIMEOUT_VARIABLE: "1800"}
    started = time.time()
    ranks = [subprocess.Popen([sys.executable, "tests/distributed_checks.py", "-", "fail"], cwd=ROOT, text=True,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    stderr = [process.communicate(timeout=200)[1] for process in ranks]
    assert all(process.returncode != 0 for process in ranks) and time.time() - started < 120
    assert len(failure_lines(stderr[1])) == 1
    assert "stopping rank 0: rank 1 failed" in stderr[0], stderr[0][-3000:]


# grpo.py and prime.py under torchrun: 2-process runs of two steps, their checkpoints, and exact resumes.
RUN = ["--total-steps", "2", "--save-every", "1", "--num-prompts", "4", "--group-size", "4", "--max-new-tokens", "48",
       "--micro-batch-size", "4", "--eval-size", "8", "--eval-every", "0"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """{script: (run folder, the finished process)} of each trainer's 2-process run, run once when first asked for."""
    done = {}

    def run(script: str):
        if script not in done:
            runs = tmp_path_factory.mktemp(script.removesuffix(".py"))
            result = torchrun(2, script, *RUN, "--runs-dir", str(runs))
            check_ran(result)
            [run_dir] = runs.iterdir()
            done[script] = run_dir, result
        return done[script]

    return run


@pytest.mark.parametrize("script", ["grpo.py", "prime.py"])
def test_trainer_runs_under_torchrun_with_rank_0_alone_writing(two_process_runs, script):
    run_dir, result = two_process_runs(script)
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2]  # one line per step: rank 0's
    assert result.stdout.count("held-out greedy accuracy at step 0") == 1
    assert result.stdout.count(f"{script.removesuffix('.py')}, tiny on arithmetic") == 1  # the summary
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]
    saved = run_dir / "checkpoints" / "step_2"
    assert sorted(p.name for p in (saved / "optimizers").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # Each model's folder is a plain Hugging Face model: its weights are the fp32 masters, trained.
    for folder in [saved, saved / "prm"] if script == "prime.py" else [saved]:
        loaded = load_model(str(folder), "cpu")
        assert next(loaded.parameters()).dtype == torch.float32
        assert not all(torch.equal(a, b) for a, b in zip(loaded.parameters(), load_model("tiny", "cpu").parameters()))


@pytest.mark.parametrize("script", ["hicra.py", "pure.py", "tempo.py", "gigpo.py"])
def test_every_other_trainer_trains_under_torchrun(script, tmp_path):
    """The other four carry the same plumbing lines (the skeleton test) and their own method blocks: two
    steps on two processes, one log and one summary from rank 0."""
    result = torchrun(2, script, *RUN, "--runs-dir", str(tmp_path))
    check_ran(result)
    [run_dir] = tmp_path.iterdir()
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2]
    assert result.stdout.count("held-out greedy accuracy at step 0") == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]


@pytest.mark.parametrize("script", ["grpo.py", "prime.py"])
def test_resume_under_torchrun_continues_exactly(two_process_runs, script, tmp_path):
    run_dir, _ = two_process_runs(script)
    resumed = tmp_path / run_dir.name
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_2")
    check_ran(torchrun(2, script, "--resume", str(resumed)))
    for weights in ["model.safetensors", "prm/model.safetensors"] if script == "prime.py" else ["model.safetensors"]:
        uninterrupted = load_file(run_dir / "checkpoints" / "step_2" / weights)
        again = load_file(resumed / "checkpoints" / "step_2" / weights)
        assert all(torch.equal(uninterrupted[name], again[name]) for name in uninterrupted)
    timeless = [{key: value for key, value in m.items() if not key.startswith(("time_", "tokens_per_sec"))}
                for m in (read_metrics(run_dir)[-1], read_metrics(resumed)[-1])]
    assert timeless[0] == timeless[1]


def test_a_torchrun_checkpoint_resumes_in_plain_python_with_the_same_optimizer_states(two_process_runs, tmp_path):
    run_dir, _ = two_process_runs("grpo.py")
    resumed = tmp_path / run_dir.name
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_2")
    checkpoint = resumed / "checkpoints" / "step_1"
    # The two ranks' shards, loaded into one process, are the whole optimizer state.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(checkpoint / "optimizers", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)["optimizer"]["state"]
    policy = load_model(str(checkpoint), "cpu")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    distributed.load_optimizer_states(checkpoint / "optimizers", {"optimizer": (policy, optimizer)})
    for (name, parameter) in policy.named_parameters():
        assert torch.equal(optimizer.state[parameter]["exp_avg_sq"], whole[name]["exp_avg_sq"])
    result = run_trainer("grpo.py", "--resume", str(resumed))
    check_ran(result)
    assert [m["step"] for m in read_metrics(resumed)] == [0, 1, 2]


def test_grpo_samples_with_one_vllm_engine_per_rank_synced_from_the_shards(tmp_path):
    # Each rank's in-process vLLM engine (external launcher) gets the weights gathered from the shards;
    # every rank checks the whole batch against the trainer's log-probs, and leaves cleanly at the end.
    result = torchrun(2, "grpo.py", "--rollout", "vllm", "--total-steps", "2", "--num-prompts", "3", "--group-size",
                      "3", "--max-new-tokens", "48", "--eval-size", "6", "--eval-every", "0", "--runs-dir",
                      str(tmp_path), timeout=400)
    check_ran(result)
    [run_dir] = tmp_path.iterdir()
    assert all(m["sampler_logp_diff"] < 1e-5 for m in read_metrics(run_dir) if m["step"] > 0)

