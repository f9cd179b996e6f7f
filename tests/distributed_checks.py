"""Checks that run inside `torchrun` (or plain python, as the reference), for tests/test_distributed.py.

    torchrun --standalone --nproc-per-node 2 tests/distributed_checks.py FOLDER parity generate
    python tests/distributed_checks.py FOLDER parity
    torchrun --standalone --nproc-per-node 2 tests/distributed_checks.py - fail

Rank 0 writes what each check measured to FOLDER/<check>-<processes>.pt (torch.save; "plain" without
torchrun) for the test to compare; `parity` reads the batch from FOLDER/batch.pt.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import distributed  # noqa: E402  (the rest is imported where used: `fail` starts fast)

# grpo.py's update on one fixed batch of 8 responses, of which `trained` have a non-zero advantage
# (row 5 has none: 7 trained rows split 4 + 3 over two ranks). micro_batch_size 1 leaves one rank an
# empty micro-batch; "one trained row" leaves one rank nothing at all.
PARITY_CONFIGS = {
    "token-mean": dict(loss_aggregation="token-mean", micro_batch_size=3),
    "seq-mean-token-mean": dict(loss_aggregation="seq-mean-token-mean", micro_batch_size=1),
    "seq-mean-token-sum": dict(loss_aggregation="seq-mean-token-sum", micro_batch_size=2),
    "dr-grpo": dict(loss_aggregation="dr-grpo", micro_batch_size=3),
    "2 epochs": dict(loss_aggregation="token-mean", num_epochs=2, micro_batch_size=2),
    "kl, 2 epochs x 2 minibatches": dict(loss_aggregation="token-mean", kl_coef=0.1, num_epochs=2, num_minibatches=2,
                                         micro_batch_size=3),
    "one trained row": dict(loss_aggregation="token-mean", micro_batch_size=3, trained_rows=[2]),
    "gradient checkpointing": dict(loss_aggregation="token-mean", micro_batch_size=3, gradient_checkpointing=True),
}
# prime.py's PRM step and advantages on the same batch (2 groups of 4, outcomes below): the PRM's
# gradient, its process rewards q and the batch-whitened advantages.
PRIME_CONFIGS = {
    "prime: reward-then-update": dict(micro_batch_size=3),
    "prime: update-then-reward, paper baseline": dict(micro_batch_size=1, prm_order="update-then-reward",
                                                      process_baseline="paper"),
}
PRIME_OUTCOMES = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
STEPS = 3


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor).detach().clone()


def recording_gradients(model, recorded: dict):
    """torch.nn.utils.clip_grad_norm_ that first records `model`'s full gradients, then clips and records the norm."""
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, **kwargs):
        recorded["gradients"].append({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
        norm = clip(parameters, max_norm, **kwargs)
        recorded["norms"].append(full(norm))
        return norm

    return recording_clip


def parity(folder: Path) -> dict:
    """For each configuration: the gradients of every optimizer step (before clipping), the clipped
    norm, the metrics and the outputs of each update (pi_old; PRIME's q and advantages), and the
    parameters after STEPS updates."""
    import grpo
    import prime
    from common.model import load_model

    device = distributed.start("cpu")  # already started: this rank's device
    batch = torch.load(folder / "batch.pt", weights_only=True)
    clip = torch.nn.utils.clip_grad_norm_
    results = {}
    for name, config in {**PARITY_CONFIGS, **PRIME_CONFIGS}.items():
        torch.manual_seed(0)
        recorded = {"gradients": [], "norms": [], "metrics": [], "outputs": []}
        if name in PRIME_CONFIGS:
            args = prime.Args(**config)
            model, reference = load_model("tiny", device), load_model("tiny", device).requires_grad_(False)
        else:
            args = grpo.Args(**{key: value for key, value in config.items() if key != "trained_rows"})
            model = load_model("tiny", device, gradient_checkpointing=args.gradient_checkpointing)
            reference = load_model("tiny", device).requires_grad_(False) if args.kl_coef > 0 else None
            trained = torch.zeros(batch["mask"].shape[0], 1)
            trained[config.get("trained_rows", [0, 1, 2, 3, 4, 6, 7])] = 1
            step_batch = {**batch, "advantages": batch["advantages"] * trained}
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        torch.nn.utils.clip_grad_norm_ = recording_gradients(model, recorded)
        for _ in range(STEPS):
            if name in PRIME_CONFIGS:
                outcomes = torch.tensor(PRIME_OUTCOMES)
                q, metrics = prime.update_prm(model, reference, optimizer, scheduler, batch, outcomes, args)
                output = prime.prime_advantages(q, outcomes, batch["mask"], 4, args.process_baseline)
            else:
                metrics, output = grpo.update_policy(model, reference, optimizer, scheduler, step_batch, args)
            recorded["metrics"].append(metrics)
            recorded["outputs"].append(output)
        torch.nn.utils.clip_grad_norm_ = clip
        recorded["parameters"] = {n: full(p) for n, p in model.named_parameters()}
        results[name] = recorded
    return results


def uneven_generation(folder: Path) -> list[dict]:
    """Each rank generates greedily on the sharded tiny model with its own prompt and its own length
    (4 tokens on rank 0, 40 on rank 1), so rank 0 is done long before rank 1."""
    from common.build_tiny import build_tokenizer
    from common.data import render_prompt
    from common.model import load_model
    from common.rollout import generate

    device = distributed.start("cpu")  # already started: this rank's device
    tokenizer = build_tokenizer()
    policy = load_model("tiny", device)
    question = ["Compute 12+34.", "Compute 99-10+11-40."][distributed.rank() % 2]
    started = time.time()
    rollout = generate(policy, tokenizer, [render_prompt(tokenizer, question, "chat")], 4 + 36 * distributed.rank(),
                       greedy=True)
    return distributed.gather_objects({"question": question, "tokens": rollout.completion_ids[0].tolist(),
                                       "seconds": time.time() - started})


def failing_rank(folder: Path):
    """Rank 1 stops with a one-line error while rank 0 is busy for ten minutes and then waits in a collective."""
    if distributed.rank() == 1:
        time.sleep(2)
        sys.exit("distributed_checks.py: error: rank 1 stops here on purpose")
    time.sleep(600)
    distributed.barrier()


CHECKS = {"parity": parity, "generate": uneven_generation, "fail": failing_rank}

if __name__ == "__main__":
    distributed.start("cpu")
    processes = distributed.world_size() if distributed.is_distributed() else "plain"
    for check in sys.argv[2:]:
        result = CHECKS[check](Path(sys.argv[1]))
        if distributed.is_main() and result is not None:
            torch.save(result, Path(sys.argv[1]) / f"{check}-{processes}.pt")
    distributed.close()
