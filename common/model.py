"""Load a causal LM and its tokenizer by alias, hub id or local folder.

Every user mistake (unknown name, hub model while offline, folder without weights) becomes a
one-line `UsageError`, never a traceback from transformers.
"""

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


def default_dtype(device: str) -> torch.dtype:
    # GPUs without bf16 (V100, T4) get fp32 rather than fp16: fp16 training would need loss scaling.
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


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
):
    """Causal LM on `device`, in eval() mode (as from_pretrained returns it).

    `gradient_checkpointing` None means on with CUDA and off on a CPU: it trades about a third more
    compute for activations a 1.5B-7B model cannot hold otherwise, a trade the CPU-sized default
    model does not need.

    Eval mode is right for rollouts and for a frozen reference model. The trainer switches the
    policy to train() around its loss: gradient checkpointing only runs in train mode, and in train
    mode it also drops the KV cache, which generate() needs.

    Under torchrun the model comes back sharded over the ranks (common.distributed.shard), loaded
    on the CPU first so that no GPU ever holds all of it. On GPUs the default there is fp32 master
    weights (the shards, their gradients and AdamW states) with bf16 compute, through FSDP2's
    mixed-precision policy.
    """
    device = device or default_device()
    sharded = distributed.is_distributed()
    compute_dtype = None
    if dtype is None:
        dtype = default_dtype(device)
        if sharded and dtype != torch.float32:
            dtype, compute_dtype = torch.float32, dtype
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    source = resolve_model(name)
    try:
        # Safetensors only: pickled .bin weights can run arbitrary code when loaded.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UsageError(_cannot_load("model", name, source, err)) from err
    if sharded:
        model = distributed.shard(model, device, compute_dtype)
    else:
        model.to(device)
    if gradient_checkpointing is None:
        gradient_checkpointing = str(device).startswith("cuda")
    if gradient_checkpointing:
        # Non-reentrant checkpointing works without inputs that require grad (frozen embeddings).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Training forwards need no KV cache; generate() still uses one (generation_config.use_cache).
        model.config.use_cache = False
    return model


def _cannot_load(what: str, name: str, source: str, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(source).is_dir():
        return f"cannot load the {what} in folder {source}: {reason}"
    return (
        f"cannot load {what} {name!r} from the Hugging Face hub: a hub model needs network access and "
        f"an existing id; pass a local folder instead ({reason})"
    )
