"""Rollouts from vLLM, in the trainer's own process, given the policy's weights after every update.

The engine lives beside the trainer (one process, one GPU or the CPU; under torchrun, one engine per
rank on the rank's own GPU, filled with the weights gathered from the shards) and gets the policy's
weights through vLLM's in-place `reload_weights`, called through `collective_rpc`: it works
in-process on GPU and CPU alike (vLLM's weight-transfer backends do not run on its CPU build), and
the tensors pass by reference, with no serialisation and no file. The engine starts with dummy
weights and is filled by the same sync that runs after every update, so a sync that does not
take effect shows up on the very first batch.

The check: vLLM returns each sampled token's log-prob, and the trainer computes the same tokens'
log-probs in its first forward pass over the batch anyway. `check_and_sync` compares the two on
every batch and stops the run with one line when they differ by more than numerical noise,
which is what a skipped, stale or partial sync looks like (one peer's sleep-mode path sampled
from the base checkpoint for weeks; importance ratios near 3e-7 were the only sign).
"""

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from common import distributed
from common.model import compute_dtype, resolve_model
from common.rollout import Rollout, completion_mask_and_truncation, decode_completions, eos_token_ids, sampler_mismatch

# In-process engine: the trainer's tensors reach it by reference. vLLM reads this when it starts.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the trainer's output

from vllm import LLM, SamplingParams  # noqa: E402  (after the environment above)

# Default stop threshold of the check: mean |log pi_trainer - log pi_sampler| per token, in nats,
# by dtype (benchmarks/benchmark_vllm.py; docs/vllm.md). Measured on CPU, float32: 1e-7 to
# 1e-6 in sync, 7e-3 to 0.4 with one sync skipped at learning rate 1e-4. Half precision: 2e-3 to
# 0.04 in sync here (0.04 on the 135M model: its logits are rounded to bfloat16), about 0.03 (RMS)
# between a GPU trainer and vLLM on Qwen2.5-0.5B (ServiceNow/Fast-LLM #525). A stale output layer
# gives 15-35, and an engine left with its dummy weights 9 (tiny model).
CHECK_THRESHOLDS = {torch.float32: 1e-3, torch.bfloat16: 0.2, torch.float16: 0.2}


def cpu_kv_cache_bytes(config, dtype: torch.dtype, max_model_len: int, batch_size: int) -> int:
    """KV-cache memory for `batch_size` sequences of up to `max_model_len` tokens.

    vLLM's CPU backend otherwise reserves a fraction of the whole machine's memory (its
    gpu_memory_utilization), which a shared or small machine does not have.
    """
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8  # keys and values
    return bytes_per_token * batch_size * (max_model_len + 128)  # + one CPU block of slack per sequence


class VLLMEngine:
    """A vLLM engine colocated with the trainer, sampling from the policy's latest weights.

    `max_model_len`: longest prompt plus --max-new-tokens (sizes the context and, on a CPU, the
    KV cache for `batch_size` sequences). `gpu_memory_utilization`: the share of the GPU vLLM may
    hold while awake (its weights, activations and KV cache). `sleep_mode` (default: on with
    CUDA): between rollouts vLLM frees all its GPU memory (level 2: weights and KV cache), so
    training gets it back; every wake-up is followed by a full weight sync. `check_threshold`:
    the check's stop threshold (default: CHECK_THRESHOLDS by the dtype the policy computes in).
    """

    name = "vllm"

    def __init__(self, policy, tokenizer, model_source: str, *, max_model_len: int, batch_size: int, seed: int,
                 gpu_memory_utilization: float, sleep_mode: bool | None, check_threshold: float | None,
                 trust_remote_code: bool = False):
        device = next(policy.parameters()).device
        on_gpu = device.type == "cuda"
        self.policy, self.tokenizer = policy, tokenizer
        # A bf16-mixed policy (fp32 master weights, bf16 compute) is sampled in bf16, from its weights cast on every sync.
        self.device, self.dtype = device, compute_dtype(policy)
        self.eos_ids = eos_token_ids(policy, tokenizer)
        self.sleep_mode = on_gpu if sleep_mode is None else sleep_mode
        self.training_gpu_share = gpu_memory_utilization if on_gpu and not self.sleep_mode else 0.0
        self.threshold = CHECK_THRESHOLDS[self.dtype] if check_threshold is None else check_threshold
        if on_gpu:
            memory = {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": self.sleep_mode}
        else:  # eager: vLLM's CPU compile (torch inductor) took 5 minutes here, against 3 s to start eager
            memory = {"kv_cache_memory_bytes": cpu_kv_cache_bytes(policy.config, self.dtype, max_model_len, batch_size),
                      "enforce_eager": True}
        if distributed.is_distributed():  # one engine per rank, in this process, beside torchrun's process group
            memory["distributed_executor_backend"] = "external_launcher"
            distributed.before_close(lambda: self.llm.llm_engine.engine_core.shutdown())
        self.llm = LLM(
            model=resolve_model(model_source), dtype=self.dtype, seed=seed, max_model_len=max_model_len,
            load_format="dummy",  # the weights come from the policy, by the same sync as after every update
            generation_config="vllm",  # no sampling defaults from the model's generation_config.json
            logprobs_mode="processed_logprobs",  # after temperature: the log-probs the tokens were drawn with
            trust_remote_code=trust_remote_code, **memory)
        # Every reload warns that the rotary embedding "failed to load weights": it has none, only a
        # precomputed table. (Set after LLM(), which reconfigures vLLM's loggers.) A real failure
        # still shows: the check catches its effect on the log-probs.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self.asleep, self.held_awake, self.syncs = False, False, 0
        self.sync()

    @torch.no_grad()
    def sync(self):
        """Copy the policy's weights into the engine (waking it first if it sleeps).

        Every name a weight has is sent, tied ones twice (`lm_head.weight` beside
        `model.embed_tokens.weight`): vLLM's CPU backend keeps a repacked copy of the output
        layer, which goes stale if only the embedding arrives (log-probs then off by 15-35 nats).
        """
        if self.asleep:
            torch.cuda.empty_cache()  # hand the trainer's cached free blocks back, for vLLM to map
            self.llm.wake_up(tags=["weights"])  # weights first, so loading them never meets a full KV cache
        # Under torchrun each weight is gathered from the shards in turn, on every rank (common.distributed).
        weights = ((name, tensor.to(self.dtype)) for name, tensor in distributed.full_weights(self.policy))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.asleep:
            if not self.llm.wake_up(tags=["kv_cache"]):
                raise RuntimeError("vLLM did not wake up fully after its weights and KV cache were restored")
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached prompt keys and values were computed with the old weights
        self.syncs += 1

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 1.0, greedy: bool = False) -> Rollout:
        """Sample one completion per prompt string (repeat a prompt G times for a group of G), as
        `common.rollout.generate` does, with the sampler's log-probs in `Rollout.logprobs`.

        Consecutive copies of a prompt go to vLLM as one request for n samples. Sampling is from
        the full softmax(logits / temperature), no top-k or top-p, so the log-probs are exact.
        """
        if self.asleep:  # slept after the last rollout and no update came since (evaluation): same weights
            self.sync()
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        requests = []  # [token ids, number of samples]
        for ids in prompt_ids:
            if requests and requests[-1][0] == ids:
                requests[-1][1] += 1
            else:
                requests.append([ids, 1])
        sampling = {"temperature": 0.0} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0,
                                                         "min_p": 0.0, "logprobs": 0}
        # Token ids in, token ids out (detokenize=False): texts are decoded here, as in the transformers path.
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, stop_token_ids=self.eos_ids, detokenize=False, **sampling)
                  for _, n in requests]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], params, use_tqdm=False)
        completions = [sample for output in outputs for sample in sorted(output.outputs, key=lambda sample: sample.index)]
        if self.sleep_mode and not self.held_awake:
            self._sleep()
        return self._rollout(prompt_ids, completions)

    @contextlib.contextmanager
    def awake(self):
        """Hold the engine awake over several generate calls, as an agent's turns make them, and let it
        sleep once they are done: one wake-up and one weight sync per rollout instead of one per turn."""
        self.held_awake = True
        try:
            yield
        finally:
            self.held_awake = False
            if self.sleep_mode and not self.asleep:
                self._sleep()

    def _sleep(self):
        self.llm.sleep(level=2)  # weights and KV cache freed: the next sync refills the weights
        self.asleep = True

    def _rollout(self, prompt_ids: list[list[int]], completions) -> Rollout:
        """vLLM's outputs as a Rollout: left-padded prompts, right-padded completions, masks from the first EOS."""
        pad, size = self.tokenizer.pad_token_id, len(prompt_ids)
        prompt_length = max(len(ids) for ids in prompt_ids)
        completion_length = max(len(sample.token_ids) for sample in completions)
        prompts = torch.full((size, prompt_length), pad, dtype=torch.long)
        prompt_mask = torch.zeros((size, prompt_length), dtype=torch.long)
        completion_ids = torch.full((size, completion_length), pad, dtype=torch.long)
        logprobs = torch.zeros((size, completion_length))
        for row, (ids, sample) in enumerate(zip(prompt_ids, completions)):
            prompts[row, prompt_length - len(ids):] = torch.tensor(ids)
            prompt_mask[row, prompt_length - len(ids):] = 1
            length = len(sample.token_ids)
            completion_ids[row, :length] = torch.tensor(sample.token_ids)
            if sample.logprobs is not None:  # one {token: Logprob} per position; the sampled token is in it
                logprobs[row, :length] = torch.tensor([step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)])
        completion_mask, truncated = completion_mask_and_truncation(completion_ids, self.eos_ids)
        texts = decode_completions(self.tokenizer, completion_ids, completion_mask)
        greedy = completions[0].logprobs is None
        return Rollout(prompts.to(self.device), prompt_mask.to(self.device), completion_ids.to(self.device),
                       completion_mask.to(self.device), truncated.to(self.device), texts,
                       None if greedy else (logprobs * completion_mask).to(self.device))

    def check_and_sync(self, rollout: Rollout, trainer_logprobs: torch.Tensor) -> dict:
        """Check that `rollout` was sampled from the policy, then sync the updated policy in.

        `trainer_logprobs` [B, C]: the trainer's log-probs of the rollout's tokens before its update
        (NaN on sequences it left out). Returns the step's metrics: the mean |log-prob difference|
        per token and the spread of the per-token ratio pi_trainer / pi_sampler, and the sync time.
        Stops the run with one line when the difference is above the threshold.
        """
        metrics = sampler_mismatch(trainer_logprobs, rollout.logprobs, rollout.completion_mask)
        if metrics["sampler_logp_diff"] is not None and metrics["sampler_logp_diff"] > self.threshold:
            program = Path(sys.argv[0]).name  # as argparse names it: "grpo.py"
            # Under torchrun every rank checks the whole batch (all ranks' samples), so all stop here together.
            distributed.stop(
                f"{program}: error: vLLM is not sampling from the policy being trained: its log-probs differ from "
                f"the trainer's by {metrics['sampler_logp_diff']:.4g} nats per token on average (threshold "
                f"{self.threshold:g} for {str(self.dtype).removeprefix('torch.')}; ratios "
                f"{metrics['sampler_ratio_min']:.3g} to {metrics['sampler_ratio_max']:.3g}), so weight sync "
                f"{self.syncs} did not reach it; --rollout hf trains without vLLM")
        started = time.time()
        self.sync()
        return {**metrics, "time_sync": time.time() - started}

