"""Batched, KV-cached generation on a Megatron-Core GPTModel at any TP x PP layout.

Megatron-Core parts used (megatron.core.inference):
- ``GPTInferenceWrapper``: the forward step with its inputs (tokens, position ids, causal
  mask per context window) and the pipeline-parallel hand-off between stages (its p2p
  send / recv helpers); we override ``_forward`` only to keep the logits vocab-parallel
  (the output layer runs with ``runtime_gather_output=False``) instead of all-gathering the
  whole vocabulary on every rank;
- ``StaticInferenceContext``: the KV cache (one [max_seq, max_batch, groups, head_dim] key and
  value buffer per layer, filled by the attention layers) and its sequence offset.
The decode loop is ours (instead of Megatron's ``TextGenerationController``) because its
sampler draws from the TP-gathered logits with one torch generator for the batch; we need
per-request seeds, shard-local layout-independent sampling (sampler.py), stop strings and
the decodable-id mask.

Batching follows Megatron's static controller: prompts are right-padded; the first step
runs the prompt prefix every request shares (the shortest prompt length) through the model,
then one position per step; a request whose prompt is longer keeps its own prompt token at
that position (the sampled one is discarded), so every row sees exactly its own tokens at
positions 0, 1, 2, ... and the causal mask needs no padding mask. The sampler's step key is
the request's own count of generated tokens, so a request's tokens do not depend on the
batch it is in.
With PP the last stage chooses the ids; they are broadcast from it to every stage over the
pipeline group (the first stage needs them as the next input). Every rank stops at the same
step (stop decisions are made from identical ids on every rank). NaN logits (or a row with
nothing to sample) travel in that same broadcast as a negative sentinel id (errors.py), so
every stage raises the same GenerationError after it instead of waiting for ids that never come.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_csd.generation.errors import check_chosen
from megatron_csd.generation.params import GenerationRequest, GenerationResult, SamplingParams
from megatron_csd.generation.sampler import choose_token_codes
from megatron_csd.generation.stopping import StopState


def _unwrap(model):
    while not hasattr(model, "csd_model_config") and hasattr(model, "module"):
        model = model.module
    return model


def _wrapper_class():
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )

    class VocabParallelGPTInferenceWrapper(GPTInferenceWrapper):
        """Megatron's GPT inference wrapper returning this rank's vocabulary shard of the logits.

        GPTModel asserts ``runtime_gather_output`` in inference mode; the output layer is
        called with ``runtime_gather_output=False`` for the duration of the forward instead, so
        no rank materialises the whole vocabulary (the sampler reduces across shards).
        """

        def _forward(self, inference_input):
            layer = getattr(self.model, "output_layer", None) if self.model.post_process else None
            if layer is not None:
                original = layer.forward
                # An instance-level forward (the trainer's fused-head capture) must come back too.
                own_forward = layer.__dict__.get("forward")

                def shard_forward(hidden, weight=None, runtime_gather_output=None, **kwargs):
                    return original(hidden, weight=weight, runtime_gather_output=False, **kwargs)

                layer.forward = shard_forward
            try:
                return self.model(inference_input["tokens"], inference_input["position_ids"],
                                  inference_input["attention_mask"],
                                  inference_context=self.inference_context, runtime_gather_output=True)
            finally:
                if layer is not None:
                    if own_forward is not None:
                        layer.forward = own_forward
                    else:
                        del layer.forward  # back to the class's forward

    return VocabParallelGPTInferenceWrapper


def _build_wrapper(model, batch_size: int, max_len: int, params_dtype):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )

    config = model.config
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size, params_dtype=params_dtype,
        inference_batch_times_seqlen_threshold=-1, padded_vocab_size=model.vocab_size,
        inference_max_requests=batch_size, inference_max_seq_length=max_len)
    context = StaticInferenceContext(batch_size, max_len)
    wrapper = _wrapper_class()(model, wrapper_config, context)
    wrapper.prep_model_for_inference()
    return wrapper, context


def check_requests(requests, params, *, vocab_size: int, max_positions: int) -> None:
    """ValueError for prompt ids outside the vocabulary, a prompt filling every position, or
    an eos id outside the vocabulary (run before any model work: the CLI calls it early)."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int (the model's real vocabulary), got {vocab_size!r}")
    for index, request in enumerate(requests):
        bad = [i for i in request.prompt_ids if i >= vocab_size]
        if bad:
            raise ValueError(f"request {index}: prompt id {bad[0]} is outside the model's "
                             f"vocabulary of {vocab_size} ids")
        if len(request.prompt_ids) >= max_positions:
            raise ValueError(f"request {index}: prompt of {len(request.prompt_ids)} tokens leaves "
                             f"no room below the model's {max_positions} positions")
    if params.eos_id is not None and params.eos_id >= vocab_size:
        raise ValueError(f"eos_id {params.eos_id} is outside the model's vocabulary of {vocab_size} ids")


@torch.no_grad()
def _generate_batch(model, requests, params, *, limit, tokenizer, tp_group, pp_group, vocab_start,
                    first_request=0):
    from megatron.core import parallel_state

    max_positions = model.max_sequence_length
    lengths = [len(r.prompt_ids) for r in requests]
    total = min(max(lengths) + params.max_new_tokens, max_positions)
    batch = len(requests)
    device = next(model.parameters()).device
    tokens = torch.zeros(batch, total, dtype=torch.int64)
    for row, request in enumerate(requests):
        tokens[row, :lengths[row]] = torch.tensor(request.prompt_ids)
    tokens = tokens.to(device)
    params_dtype = next(model.parameters()).dtype
    wrapper, context = _build_wrapper(model, batch, total, params_dtype)
    inputs = wrapper.prep_inference_input(tokens)
    states = [StopState(params, tokenizer, lengths[row], max_positions) for row in range(batch)]
    last_stage = parallel_state.is_pipeline_last_stage()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    start, end = 0, min(lengths)
    while end < total and not all(state.done for state in states):
        window = wrapper.get_batch_for_context_window(inputs, start, end)
        logits = wrapper.run_one_forward_step(window)
        if end >= max(lengths):  # every prompt is in the cache: one new position per step
            context.enable_decode_mode()
        chosen = torch.zeros(batch, dtype=torch.int64, device=device)
        if last_stage:
            chosen = choose_token_codes(logits[:, -1, :], params, vocab_start=vocab_start,
                                        limit=limit, seeds=[r.seed for r in requests],
                                        steps=[s.num_generated for s in states], tp_group=tp_group)
        if pp_size > 1:
            dist.broadcast(chosen, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=pp_group)
        chosen = chosen.tolist()
        active = [end >= lengths[row] and not state.done  # else: position `end` is still prompt
                  for row, state in enumerate(states)]
        # a sentinel (< 0) from the last stage raises here on every rank (identical ids, states)
        check_chosen([c if a else 0 for c, a in zip(chosen, active)], first_request=first_request,
                     steps=[s.num_generated for s in states])
        for row, state in enumerate(states):
            if active[row]:
                state.add(chosen[row])
                tokens[row, end] = chosen[row]
        start, end = end, end + 1
    for state in states:
        state.finish_at_length()
    return [state.result() for state in states]


def generate(model, requests: list[GenerationRequest], params: SamplingParams, *, vocab_size: int,
             tokenizer=None, max_batch_size: int = 8) -> list[GenerationResult]:
    """Generate a completion for every request (collective over the model's TP x PP group).

    Every rank passes identical `requests` and gets identical results. `vocab_size`: the
    model's real vocabulary (columns >= it are Megatron padding, never chosen);
    ``params.decodable_vocab_size`` lowers that limit further (the tokenizer's size). Requests
    are processed in batches of at most `max_batch_size`, in order. Generation also ends when
    the model's maximum sequence length is reached (finish_reason "length").
    Raises GenerationError on every rank when the model's logits are NaN (errors.py).
    """
    from megatron.core import parallel_state

    from megatron_csd.parallel.vocab import vocab_shard_range

    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    requests = list(requests)
    if not all(isinstance(r, GenerationRequest) for r in requests):
        raise TypeError("requests must be a list of GenerationRequest")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the completion; pass tokenizer=")
    inner = _unwrap(model)
    if isinstance(vocab_size, int) and vocab_size > inner.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} exceeds the model's padded vocabulary {inner.vocab_size}")
    check_requests(requests, params, vocab_size=vocab_size, max_positions=inner.max_sequence_length)
    limit = vocab_size
    if params.decodable_vocab_size is not None:
        limit = min(limit, params.decodable_vocab_size)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    vocab_start, _ = vocab_shard_range(inner.vocab_size, tp_rank, tp_size)
    was_training = inner.training
    inner.eval()
    try:
        results = []
        for first in range(0, len(requests), max_batch_size):
            results += _generate_batch(
                inner, requests[first:first + max_batch_size], params, limit=limit,
                tokenizer=tokenizer, tp_group=parallel_state.get_tensor_model_parallel_group(),
                pp_group=parallel_state.get_pipeline_model_parallel_group(), vocab_start=vocab_start,
                first_request=first)
        return results
    finally:
        inner.train(was_training)
