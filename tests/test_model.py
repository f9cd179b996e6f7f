"""common/model.py on a tiny random Qwen2 saved to a temporary folder (offline, seconds on a CPU)."""

import json
import time

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import common.model
from common import UsageError
from common.model import (
    MODEL_ALIASES,
    default_precision,
    load_model,
    load_tokenizer,
    resolve_model,
)


@pytest.fixture
def tiny_dir(tmp_path, tiny_tokenizer):
    """A folder as save_pretrained writes it: config, safetensors weights and tokenizer."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    return tmp_path, model


def test_local_folder_loads_the_same_model(tiny_dir):
    folder, model = tiny_dir
    loaded = load_model(str(folder), device="cpu")
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.dtype == torch.float32  # the CPU default
    assert not loaded.training  # eval() for rollouts; trainers switch to train() for the loss


def test_dtype_override(tiny_dir):
    folder, _ = tiny_dir
    assert load_model(str(folder), device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(str(folder), device="cpu", dtype=torch.float16).dtype == torch.float16
    assert load_model(str(folder), device="cpu", dtype="auto").dtype == torch.float32  # as saved
    with pytest.raises(UsageError, match="float32"):
        load_model(str(folder), device="cpu", dtype="fp8")


def test_default_precision_on_cpu_is_float32():
    assert default_precision("cpu") == "float32"


def test_gradient_checkpointing_keeps_gradients_and_generation(tiny_dir):
    folder, _ = tiny_dir
    plain = load_model(str(folder), device="cpu")
    checkpointed = load_model(str(folder), device="cpu", gradient_checkpointing=True)
    assert checkpointed.is_gradient_checkpointing and not checkpointed.config.use_cache
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    # generate() in eval mode still uses its KV cache and gives the same tokens.
    generated = [m.generate(ids, max_new_tokens=4, do_sample=False) for m in (plain, checkpointed)]
    assert torch.equal(*generated)
    for model in (plain, checkpointed):
        model.train()
        model(ids, labels=ids).loss.backward()
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_tokenizer_pads_left_and_keeps_its_own_pad_token(tiny_dir):
    folder, _ = tiny_dir
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|endoftext|>"  # its own pad token is kept, not replaced by EOS
    batch = tokenizer(["a", "abc"], padding=True)
    assert batch["attention_mask"][0] == [0, 0, 1]


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tiny_tokenizer):
    # A Llama-style folder: the tokenizer has no pad token, as Llama 3 has none.
    tiny_tokenizer.pad_token = None
    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("alias", MODEL_ALIASES)
def test_aliases_are_case_insensitive_hub_ids(alias):
    hub_id = MODEL_ALIASES[alias]
    assert hub_id.count("/") == 1 and hub_id.endswith("/" + alias)
    assert resolve_model(alias) == resolve_model(alias.lower()) == resolve_model(alias.upper()) == hub_id


def test_hub_ids_and_folders_pass_through(tiny_dir):
    folder, _ = tiny_dir
    assert resolve_model("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"
    assert resolve_model(str(folder)) == str(folder)


def test_tiny_is_the_built_in_folder(tiny_dir, tmp_path, monkeypatch):
    folder, _ = tiny_dir
    monkeypatch.setattr(common.model, "TINY_MODEL_DIR", folder)
    assert resolve_model("Tiny") == str(folder)
    monkeypatch.setattr(common.model, "TINY_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(UsageError, match="tiny model is missing"):
        resolve_model("tiny")


@pytest.mark.parametrize("name", ["qwen-math", "./no/such/folder", "a/b/c"])
def test_unknown_name_lists_the_aliases_on_one_line(name):
    with pytest.raises(UsageError) as error:
        resolve_model(name)
    message = str(error.value)
    assert "\n" not in message and name in message and "network" in message
    assert all(alias in message for alias in MODEL_ALIASES)


def test_hub_model_offline_is_a_usage_error_at_once(offline):
    start = time.monotonic()
    for load in (load_model, load_tokenizer):
        with pytest.raises(UsageError) as error:
            load("nobody-here/no-such-model")
        message = str(error.value)
        assert "\n" not in message and "nobody-here/no-such-model" in message and "network" in message
    assert time.monotonic() - start < 10  # no network retries


def test_folder_without_config_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer_is_a_usage_error(tiny_dir):
    folder, _ = tiny_dir
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(UsageError, match="tokenizer"):
        load_tokenizer(str(folder))


def test_pickled_weights_are_refused(tiny_dir):
    # Security rule: only safetensors; a .bin checkpoint can run code when unpickled.
    folder, model = tiny_dir
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UsageError) as error:
        load_model(str(folder))
    assert "\n" not in str(error.value) and "safetensors" in str(error.value)
