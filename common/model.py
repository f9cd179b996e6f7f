"""Load a causal LM and its tokenizer by alias, hub id or local folder.

Every user mistake (unknown name, hub model while offline, folder without weights) becomes a
one-line `UsageError`, never a traceback from transformers.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import UsageError, distributed

# Models that the implemented papers (GRPO, Dr. GRPO, HICRA, PRIME, PURE, TEMPO, GiGPO) train.
MODEL_ALIASES: dict[str, str] = {
    "Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B",
    "Qwen2.5-Math-7B": "Qwen/Qwen2.5-Math-7B",
    "Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B-Instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B",
    "Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B-Instruct",
    "Qwen3-1.7B": "Qwen/Qwen3-1.7B",
    "Qwen3-4B": "Qwen/Qwen3-4B",
    "Qwen3-4B-Base": "Qwen/Qwen3-4B-Base",
    "Qwen3-4B-Instruct-2507": "Qwen/Qwen3-4B-Instruct-2507",
    "Qwen3-8B": "Qwen/Qwen3-8B",
    "Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "Eurus-2-7B-SFT": "PRIME-RL/Eurus-2-7B-SFT",
    "DeepSeek-R1-Distill-Qwen-1.5B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
}
TINY_MODEL_DIR = Path(__file__).parent / "tiny_model"  # built-in model for CPU runs and tests
TINY_AGENT_MODEL_DIR = Path(__file__).parent / "tiny_agent_model"  # built-in agent model, for common/keydoor.py

_ALIASES_BY_LOWER = {alias.lower(): hub_id for alias, hub_id in MODEL_ALIASES.items()}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_model(name: str) -> str:
    """Map "tiny" or "tiny-agent", an alias (any case), a local folder or a hub id `org/name` to what from_pretrained takes."""
    if name.lower() in _ALIASES_BY_LOWER:
        return _ALIASES_BY_LOWER[name.lower()]
    built_in = {"tiny": (TINY_MODEL_DIR, "common.build_tiny"), "tiny-agent": (TINY_AGENT_MODEL_DIR, "common.build_tiny_agent")}
    if name.lower() in built_in:
        folder, builder = built_in[name.lower()]
        if not folder.is_dir():
            raise UsageError(f"the built-in {name.lower()} model is missing from {folder}; restore it with git "
                             f"or rebuild it with python -m {builder}")
        name = str(folder)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UsageError(f"model folder {name} has no config.json; pass a folder saved with save_pretrained()")
        return name
    # A hub id is exactly `org/name`; anything else with a slash is a mistyped local path.
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return name
    raise UsageError(
        f"unknown model {name!r}: use tiny, an alias ({', '.join(MODEL_ALIASES)}), "
        "a local folder, or a hub model org/name (which needs network access)"
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS: tuple[str, ...] = ("bf16-mixed", "float32", "bfloat16")  # what --dtype accepts


def default_precision(device: str) -> str:
    """bf16-mixed on a GPU with bf16, else float32 (GPUs without bf16, V100 and T4, get fp32 rather than fp16:
    fp16 training would need loss scaling)."""
    return "bf16-mixed" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def weights_dtype(precision: torch.dtype | str | None, device: str, frozen: bool = False) -> torch.dtype | str:
    """The dtype a model's weights are loaded in under `precision` (None: default_precision).

    bf16-mixed keeps a trained model's weights in fp32 (its master weights: the optimizer updates
    them, and fp32 keeps steps that bf16 would round away) and a frozen model's in bf16 (it takes
    no update, so fp32 would only double its memory; it computes in bf16 either way).
    """
    precision = default_precision(device) if precision is None else precision
    if precision == "bf16-mixed":
        return torch.bfloat16 if frozen else torch.float32
    if isinstance(precision, str):
        if precision not in _DTYPES:
            raise UsageError(f"unknown dtype {precision!r}; use one of {', '.join(PRECISIONS)}")
        return _DTYPES[precision]
    return precision


def compute_dtype(model) -> torch.dtype:
    """The dtype `model` computes in: bf16 for a bf16-mixed model (fp32 weights under bf16 autocast), else
    its weights' dtype. A rollout engine samples in this dtype."""
    return getattr(model, "autocast_dtype", model.dtype)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with left padding, so that batched prompts all end where generation starts."""
    source = resolve_model(name)
    # A folder without tokenizer files still "loads" (as an empty tokenizer), so check first.
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        raise UsageError(f"model folder {source} has no tokenizer files; save the tokenizer next to the model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, padding_side="left", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UsageError(_cannot_load("tokenizer", name, source, err)) from err
    # Batched generation needs a pad id (Llama 3 has none). Pad positions are masked out by the
    # attention mask, so reusing EOS is harmless -- but then completion masks must come from the
    # attention mask or lengths, never from `ids != pad_token_id`, or the final EOS is lost too.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool | None = False,
    frozen: bool = False,
):
    """Causal LM on `device`, in eval() mode (as from_pretrained returns it).

    `dtype`: a precision of PRECISIONS (None: default_precision), or any torch dtype. Under
    "bf16-mixed" the weights are fp32 and every forward runs under bf16 autocast, as accelerate's
    mixed precision does (TRL; verl and OpenRLHF keep fp32 masters the same way): an AdamW step of
    lr 1e-6 is below half of bf16's spacing for nearly every weight of a real model, and bf16
    weights would round it away. A `frozen` model has no gradients and, under bf16-mixed, bf16
    weights (see weights_dtype).

    `gradient_checkpointing` None means on with CUDA and off on a CPU: it trades about a third more
    compute for activations a 1.5B-7B model cannot hold otherwise, a trade the CPU-sized default
    model does not need.

    Eval mode is right for rollouts and for a frozen reference model. The trainer switches the
    policy to train() around its loss: gradient checkpointing only runs in train mode, and in train
    mode it also drops the KV cache, which generate() needs.

    Under torchrun the model comes back sharded over the ranks (common.distributed.shard), loaded
    on the CPU first so that no GPU ever holds all of it; bf16-mixed is then FSDP2's mixed-precision
    policy instead of autocast (fp32 shards, their gradients and AdamW states; bf16 compute).
    """
    device = device or default_device()
    precision = default_precision(device) if dtype is None else dtype
    source = resolve_model(name)
    try:
        # Safetensors only: pickled .bin weights can run arbitrary code when loaded.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=weights_dtype(precision, device, frozen), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UsageError(_cannot_load("model", name, source, err)) from err
    mixed = precision == "bf16-mixed" and not frozen
    if distributed.is_distributed():
        # Under torchrun, bf16-mixed is FSDP2's mixed precision: each layer's fp32 shards are gathered in bf16.
        model = distributed.shard(model, device, torch.bfloat16 if mixed else None)
    else:
        model.to(device)
    if mixed:
        model.autocast_dtype = torch.bfloat16
    if mixed and not distributed.is_distributed():
        # Every forward, in training and inside generate(), computes in bf16; parameters and gradients stay fp32.
        model.forward = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)(model.forward)
    if frozen:
        model.requires_grad_(False)
    if gradient_checkpointing is None:
        gradient_checkpointing = str(device).startswith("cuda")
    if gradient_checkpointing:
        # Non-reentrant checkpointing works without inputs that require grad (frozen embeddings).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Training forwards need no KV cache; generate() still uses one (generation_config.use_cache).
        model.config.use_cache = False
    return model


def lost_update_fraction(model, learning_rate: float) -> float:
    """Share of `model`'s bf16 weights that a step of `learning_rate` cannot move.

    An AdamW step moves each weight by about the learning rate (its update m / sqrt(v) is near 1
    in size). bf16 keeps 8 significant bits, so its spacing near w is 2^(e - 8) for |w| in
    [2^(e-1), 2^e), and a step below half the spacing rounds back to the same weight. Zero
    weights are not counted: bf16 resolves small values finely.
    """
    lost = total = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.bfloat16:
            _, exponent = torch.frexp(parameter.detach().float())  # |w| = m 2^e, m in [0.5, 1)
            half_spacing = torch.ldexp(torch.ones_like(parameter, dtype=torch.float), exponent - 9)
            lost += ((learning_rate < half_spacing) & (parameter != 0)).sum().item()
            total += parameter.numel()
    return lost / max(total, 1)


def gpu_memory_bytes(device: torch.device) -> int | None:
    """The memory of the GPU `device`, or None for a device whose memory is not checked (a CPU)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def check_training_fits(trained: list, frozen: list, learning_rate: float, engine):
    """At start-up: warn once when bf16 weights will lose the updates, and on a GPU stop with one line when
    the models and their training state cannot fit it, rather than run out of memory in step one.

    `trained`: the models the run updates; each needs its weights, gradients and AdamW's two moments,
    in the weights' dtype: 16 bytes per parameter in fp32 (bf16-mixed), 8 in bf16. `frozen`: models
    (or None) that only take forward passes. `engine`: the rollout engine, whose share of the GPU
    while the trainer trains (vLLM without sleep mode) is not the trainer's.
    """
    program = Path(sys.argv[0]).name
    lost = max(lost_update_fraction(model, learning_rate) for model in trained)
    if lost > 0:
        print(f"{program}: warning: --dtype bfloat16 keeps the weights and AdamW's states in bf16, and a step of "
              f"--learning-rate {learning_rate:g} is below half of bf16's spacing for {100 * lost:.1f}% of the trained "
              "weights, which it leaves unchanged; --dtype bf16-mixed (the default on GPUs) keeps fp32 master weights",
              file=sys.stderr)
    device = next(trained[0].parameters()).device
    memory = gpu_memory_bytes(device)
    if memory is None:
        return
    trained_parameters = sum(p.numel() for model in trained for p in model.parameters())
    state_bytes = sum(4 * p.numel() * p.element_size() for model in trained for p in model.parameters())
    frozen = {id(model): model for model in frozen if model is not None}.values()  # a model shared by two roles counts once
    frozen_bytes = sum(p.numel() * p.element_size() for model in frozen for p in model.parameters())
    gpus = distributed.world_size()  # under torchrun every model is sharded over all the ranks' GPUs
    available = gpus * memory * (1 - engine.training_gpu_share)
    if state_bytes + frozen_bytes > 0.9 * available:  # a tenth at least for activations and the log-softmax
        gib = 2 ** 30
        held = f", after vLLM's {engine.training_gpu_share:.0%} (no sleep mode)" if engine.training_gpu_share else ""
        whose = "the GPU's" if gpus == 1 else f"the {gpus} GPUs'"
        raise UsageError(
            f"training needs about {(state_bytes + frozen_bytes) / gib:.1f} GiB before activations "
            f"({trained_parameters / 1e9:.2f}B trained parameters x {state_bytes // max(trained_parameters, 1)} bytes: "
            f"weights, gradients and AdamW's two moments; {frozen_bytes / gib:.1f} GiB of frozen models), more than 90% "
            f"of {whose} {available / gib:.1f} GiB{held}; use more GPUs (torchrun, docs/real-models.md), a smaller "
            "model, or --dtype bfloat16 (8 bytes per parameter, but updates below bf16's resolution are lost)")


def _cannot_load(what: str, name: str, source: str, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(source).is_dir():
        return f"cannot load the {what} in folder {source}: {reason}"
    return (
        f"cannot load {what} {name!r} from the Hugging Face hub: a hub model needs network access and "
        f"an existing id; pass a local folder instead ({reason})"
    )
