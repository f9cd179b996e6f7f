"""Many processes, one run: every trainer under torchrun, with FSDP2 (PyTorch's own sharding).

    torchrun --nproc-per-node 8 grpo.py --model Qwen2.5-Math-7B ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 grpo.py ...

Under plain `python grpo.py` nothing here starts: `start` returns the device it was given, and every
other function is the single-process identity (one rank that owns every row).

How the ranks share a step (each rank is one process, on its own GPU or on the CPU with gloo):
- Every rank holds the whole step. The prompts are the same on every rank (same seed); each rank
  samples a contiguous share of them and all ranks then receive every rollout (common.rollout), so
  rewards, advantages and every statistic over the batch (token counts, group means, batch
  whitening, episode groups) are computed over the global batch by the single-process code, and
  agree on every rank without any further communication.
- The model passes are split: each rank runs its share of the rows (`micro_batches`), then the
  ranks exchange the results (`gather_rows`, `merge_rows`) or sum their gradients (FSDP2 with a
  sum reduction). Every loss is divided by the global normaliser, so the summed gradient is the
  single-process gradient and the update does not depend on the world size.
- The main random generator stays the same on every rank (it orders the minibatches); sampling
  draws from a per-rank generator forked from it (`sampling_rng`).
- Rank 0 alone prints, logs and writes the run's files; every rank writes its shard of the
  optimizer states into a checkpoint (torch.distributed.checkpoint).
- A rank that fails prints its error and the others stop within seconds: torchrun stops the
  processes of its node, and a watcher on every rank stops those of other nodes.

CLEANCREDIT_PROCESS_GROUP_TIMEOUT (seconds, default 1800) bounds how long a collective may wait;
tests set a short one.
"""

import atexit
import contextlib
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from common import UsageError

TIMEOUT_VARIABLE = "CLEANCREDIT_PROCESS_GROUP_TIMEOUT"
_state = {"device": None, "leaving": False, "closed": False, "before_close": []}


# The process group: start, size, shutdown, and failure of one rank.
def start(device: str) -> str:
    """Join torchrun's process group if this process was started by torchrun; returns this rank's device.

    `device` is "cpu" (gloo) or "cuda" (NCCL, each rank on cuda:LOCAL_RANK). Without torchrun's
    environment (plain python) nothing starts and `device` comes back unchanged. Ranks other than 0
    send their standard output to os.devnull: the run's screen is rank 0's. Errors still reach
    standard error from every rank.
    """
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return device
    if dist.is_initialized():
        return _state["device"]
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"under torchrun every rank uses its own GPU, cuda:LOCAL_RANK; pass --device cuda or cpu, "
                         f"not {device}")
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_VARIABLE, 1800)))
    dist.init_process_group(backend, timeout=timeout, device_id=torch.device(device) if backend == "nccl" else None)
    _state["device"] = device
    _watch_for_failed_ranks()
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def is_distributed() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process prints, logs and writes the run's files: rank 0, or the only process."""
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def before_close(shutdown):
    """Call `shutdown` in `close`, after the last barrier and before the process group goes (a vLLM engine
    on this rank: its own groups are built on the process group, and it destroys them and it)."""
    _state["before_close"].append(shutdown)


def close():
    """Leave the process group once every rank is done (the barrier first: destroying it right after a
    collective crashed about 1 run in 4 at exit, "terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    _state["leaving"] = True
    dist.barrier()
    _state["closed"] = True
    for shutdown in _state["before_close"]:
        shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()


def stop(message: str):
    """Exit with a one-line error that every rank reached with the same data; rank 0 prints it, once
    (and no rank reports the others as failed: they all stop)."""
    _state["closed"] = True
    if is_main():
        sys.exit(message)
    sys.exit(1)


def _failure_key() -> str:
    run, restart = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"cleancredit/failed/{run}/{restart}"  # a restarted group (--max-restarts) does not see an old failure


def _watch_for_failed_ranks():
    """Stop this rank within seconds when another rank fails, whatever node it runs on.

    torchrun stops the other processes of a failed process's node, but a rank on another node
    would wait in its next collective until the timeout (30 minutes by default). So a rank that
    exits without `close()` (an error, sys.exit) leaves its number in the rendezvous store at exit,
    and a thread on every rank polls the store once a second and ends the process when it is there.
    """
    program = Path(sys.argv[0]).name
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=30))
    key, own_rank = _failure_key(), dist.get_rank()

    def report_failure_at_exit():
        if not _state["closed"]:
            with contextlib.suppress(Exception):
                store.set(key, str(own_rank))

    def watch():
        while not _state["closed"]:
            try:
                failed = store.get(key).decode() if store.check([key]) else None
            except Exception:  # the store's host is gone: the run is over, or broken
                if not _state["leaving"]:
                    print(f"{program}: error: rank {own_rank} lost the rendezvous store; stopping", file=sys.stderr,
                          flush=True)
                    os._exit(1)
                return
            if failed is not None and failed != str(own_rank) and not _state["closed"]:
                print(f"{program}: stopping rank {own_rank}: rank {failed} failed (its error is above)",
                      file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(1.0)

    atexit.register(report_failure_at_exit)
    threading.Thread(target=watch, name="failed-rank-watcher", daemon=True).start()


# Agreement between ranks.
def agree(value):
    """Rank 0's `value` on every rank (a run folder's timestamp, a random state)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def agree_on_random_state():
    """Give every rank rank 0's main random generator (CPU and this rank's GPU), e.g. after a library
    seeded its own: the minibatch order drawn from it must be the same on every rank."""
    if world_size() == 1:
        return
    torch.set_rng_state(agree(torch.get_rng_state()))
    if torch.cuda.is_available() and _state["device"].startswith("cuda"):
        torch.cuda.set_rng_state(agree(torch.cuda.get_rng_state()))


@contextlib.contextmanager
def sampling_rng():
    """Sample from this rank's own generator, forked from the main one, which is left as it was.

    Every rank draws the same seed from the main generator (so it stays the same on all ranks) and
    adds its rank, so ranks sample different responses to the same prompt. With one process,
    nothing is forked: sampling is the single-process sampling.
    """
    if world_size() == 1:
        yield
        return
    seed = int(torch.randint(0, 2 ** 62, ()))
    cuda = [torch.device(_state["device"])] if _state["device"].startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed + rank())
        yield


def gather_objects(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (tensors inside: on the CPU)."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(totals: dict[str, float]) -> dict[str, float]:
    """Each key's sum over the ranks: statistics each rank summed over its own rows."""
    if world_size() == 1:
        return totals
    values = torch.tensor([float(totals[key]) for key in totals], dtype=torch.float64, device=_state["device"])
    dist.all_reduce(values)
    return dict(zip(totals, values.tolist()))


# The global batch: which rows each rank runs, and the results brought back together.
def row_block(count: int) -> slice:
    """This rank's contiguous block of `count` items (sizes differ by at most one): its share of the
    prompts to sample. Consecutive copies of a prompt (a group) mostly stay on one rank."""
    bounds = [count * r // world_size() for r in range(world_size() + 1)]
    return slice(bounds[rank()], bounds[rank() + 1])


def share(rows: torch.Tensor) -> torch.Tensor:
    """The rows of `rows` (global row indices, the same on every rank) that this rank runs.

    Sorted and cut into near-equal contiguous pieces, so the same set of rows always goes to the
    same ranks whatever its order (each epoch shuffles the minibatch; pi_old of a row stays where it
    was computed). One process: all of `rows`, in their order.
    """
    if world_size() == 1:
        return rows
    return torch.tensor_split(rows.sort().values, world_size())[rank()]


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """This rank's share of `rows` in micro-batches of at most `size` rows.

    One process: rows[0:size], rows[size:2 size], ... Several: every rank gets the same number of
    micro-batches, because each forward and backward of a sharded model is a collective that all
    ranks must join; a rank with fewer rows gets smaller ones, possibly empty (`shard` lets a sharded
    model run an empty batch). The ranks check that they were given the same rows.
    """
    if world_size() == 1:
        return [rows[start:start + size] for start in range(0, len(rows), size)]
    _check_same_rows(rows)
    most_rows = -(-len(rows) // world_size())  # ceil: the largest share
    count = -(-most_rows // size)
    return list(torch.tensor_split(share(rows), count)) if count else []


def _check_same_rows(rows: torch.Tensor):
    """Stop with an error if ranks were handed different rows: their main generators have diverged."""
    fingerprint = torch.tensor([len(rows), int((rows.long().cpu() * torch.arange(1, len(rows) + 1)).sum() % 1_000_003)],
                               dtype=torch.float64, device=_state["device"])
    extremes = torch.cat([fingerprint, -fingerprint])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if not torch.equal(extremes[:2], -extremes[2:]):
        raise RuntimeError("the ranks were handed different rows of the batch: their random generators diverged "
                           "(something reseeded the main generator on some ranks)")


def gather_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Results for all of `rows`, in the order of `rows`, on every rank, from each rank's results for its
    `share(rows)` (`values`, in that order: the micro-batches' results concatenated)."""
    if world_size() == 1:
        return values
    pieces = gather_objects(values.detach().cpu())
    in_sorted_order = torch.cat(pieces).to(values.device)
    result = torch.empty_like(in_sorted_order)
    result[rows.sort().indices.to(values.device)] = in_sorted_order
    return result


def merge_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`tensor` [B, ...] with every row of `rows` taken from the rank that computed it (its share)."""
    if world_size() == 1:
        return tensor
    merged = tensor.clone()
    merged[rows.to(tensor.device)] = gather_rows(tensor[share(rows).to(tensor.device)], rows)
    return merged


# The model: sharding, gathered weights for generation, full weights for an engine or a file.
def shard(model, device: str, compute_dtype: torch.dtype | None = None):
    """FSDP2 over all ranks: each decoder layer is one unit, then the rest (embeddings, final norm,
    output layer) is the root's; each rank keeps 1/world_size of every parameter, gradient and
    optimizer state on `device`, and a unit's full weights exist only during its forward and backward.

    `compute_dtype` (bf16 on GPUs) is the dtype of the gathered weights in forward and backward, while
    the shards stay in their own dtype (fp32 masters); gradients are reduced in fp32. Gradients are
    SUMMED over ranks, not averaged (FSDP2's default): each rank's loss is already divided by the
    global normaliser. (gloo has no pre-scaled sum, hence the forced plain sum.)
    """
    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise UsageError(f"cannot shard {type(model).__name__}: it names no decoder layer class (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    model.register_forward_pre_hook(_stand_in_for_empty_batch, with_kwargs=True)
    model.register_forward_hook(_drop_stand_in_row, with_kwargs=True)
    return model


def _stand_in_for_empty_batch(model, args, kwargs):
    """An empty micro-batch (a rank with fewer rows) still runs the model, on one padding row whose
    output is dropped, so that its collectives match the other ranks' (the model itself cannot run
    zero rows). The dropped row still joins the backward with zero gradients."""
    input_ids = kwargs.get("input_ids")
    model._stood_in = input_ids is not None and input_ids.shape[0] == 0
    if not model._stood_in:
        return None
    one_row = torch.zeros((1, input_ids.shape[1]), dtype=torch.long, device=input_ids.device)
    replaced = {"input_ids": one_row}
    for name in ("attention_mask", "position_ids"):
        if kwargs.get(name) is not None:
            replaced[name] = one_row + 1 if name == "attention_mask" else one_row
    return args, {**kwargs, **replaced}


def _drop_stand_in_row(model, args, kwargs, output):
    if model._stood_in:
        output.logits = output.logits[:0]
    return output


def fsdp_modules(model) -> list:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def unsharded(model):
    """Keep a sharded model's weights gathered for a whole `generate` (gathering them again for every
    token was 13-21x slower at 60M parameters), then free them: reshard() on every unit, not only
    the root. A model that is not sharded is left alone."""
    units = fsdp_modules(model)
    if not units:
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps fully_shard's choice for it
        for unit in units:
            unit.reshard()


def full_weights(model):
    """(name, full tensor) for every weight, one at a time: what an inference engine loads.

    Sharded: the names of the unwrapped Hugging Face model (tied lm_head.weight included), each
    gathered on every rank in turn (every rank must iterate it to the end), so that no rank ever
    holds the whole model twice. Not sharded: named_parameters with tied names repeated.
    """
    if not fsdp_modules(model):
        yield from ((name, tensor.detach()) for name, tensor in model.named_parameters(remove_duplicate=False))
        return
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model) -> dict:
    """The model's full state dict on rank 0's CPU (empty on the other ranks), gathered one tensor at a time."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# Checkpoints of optimizer states (torch.distributed.checkpoint: each rank writes its own shard).
def save_optimizer_states(folder: Path, optimizers: dict):
    """Write {name: (model, optimizer)} to `folder`, every rank its shard, keyed by parameter names."""
    dcp.save({name: get_optimizer_state_dict(model, optimizer) for name, (model, optimizer) in optimizers.items()},
             checkpoint_id=str(folder))


def load_optimizer_states(folder: Path, optimizers: dict):
    """Load what save_optimizer_states wrote into {name: (model, optimizer)}, re-sharded for this run's ranks."""
    states = {name: get_optimizer_state_dict(model, optimizer) for name, (model, optimizer) in optimizers.items()}
    dcp.load(states, checkpoint_id=str(folder), no_dist=not dist.is_initialized())  # plain python reads all shards
    for name, (model, optimizer) in optimizers.items():
        set_optimizer_state_dict(model, optimizer, states[name])
