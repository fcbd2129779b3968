"""On-policy training batches: responses sampled by the current student (GKD) or the teacher (SeqKD).

Every training step, :meth:`OnPolicyBatches.step_iterator` draws this data-parallel rank's
``num_microbatches x micro_batch_size`` samples from the run's resumable sampler (the very
draws the off-policy iterator makes) and decides, per sample, where its response comes from:

* **GKD** (``student_data_ratio = lambda``): sample ``g`` of the global batch (``g`` in
  ``[0, global_batch)``, its position in the global sample stream minus the step's first
  position) is replaced iff ``u(seed, iteration, g) < lambda``, with ``u`` a uniform drawn from a
  counter-based generator keyed by exactly those numbers (``numpy.random.default_rng([seed,
  iteration, g, 0])``). No generator state is carried from step to step, so the decision (and
  the generation seed ``s(seed, iteration, g)``, keyed the same way) does not depend on the TP,
  PP or DP layout, nor on how many steps ran in this process (resume needs nothing but the
  iteration and the sampler position, both in the checkpoint).
* **ImitKD** (``replay_buffer_size`` > 0): a sample picked the same way is generated and
  pushed into the replay buffer (replay_buffer.py, identical on every rank), and its slot is
  filled by a draw from the buffer keyed by (seed, iteration, g).
* **DistiLLM** (``adaptive_student_data``, with the buffer): the probability starts at
  ``student_data_ratio`` (DistiLLM: 0) and grows by ``adaptive_ratio_step`` whenever a
  validation CE is at least ``adaptive_loss_eps`` above the reference (the last value that
  raised it, first the first validation); a picked sample is generated fresh (and pushed) with
  probability ``ratio (1 - iteration / train_iters)`` or while the buffer is not full, else
  drawn from the buffer (DistiLLM's ``adaptive`` branch). Ratio, reference loss and buffer
  are checkpointed with the data sampler's position (``OnPolicyBatches.state_dict``).
* **SeqKD** (``teacher_generated``): every response is the teacher's, generated once before
  training (teacher_generated.py); no generation happens during the steps.

Replaced samples are generated before the training forward, with the student in eval mode
under ``no_grad``, by every TP/PP rank of this DP rank collectively (identical requests: all
of them drew the same samples), each DP rank generating its own samples. A request is the
stored prompt (bos + template, as prepared) with temperature ``student_sample_temperature``,
top-k/top-p off, and at most ``seq_length + 1 - len(prompt)`` new tokens (the sample's response
budget). The new sample is ``prompt + completion (+ eos when the model stopped on eos within
the budget)``, padded as any other: its ``loss_mask`` is 1 exactly on the targets that are
generated tokens (the eos included), never on a prompt or padding position. The teacher scores
those tokens in the same pipeline pass as the student (the usual teacher + student stage), the
objective and the per-token normalisation over the global batch are untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

STATE_KEY = "on_policy"
_TAG_REPLACE, _TAG_SEED, _TAG_BUFFER = 0, 1, 2
DATA, FRESH, BUFFER = "data", "fresh", "buffer"  # where a sample's response comes from


def keyed_uniform(seed: int, iteration: int, index: int, tag: int = _TAG_REPLACE) -> float:
    """A uniform in [0, 1) that depends only on (seed, iteration, index, tag)."""
    return float(np.random.default_rng([seed, iteration, index, tag]).random())


def keyed_seed(seed: int, iteration: int, index: int) -> int:
    """The generation seed of sample ``index`` of step ``iteration`` (layout-independent)."""
    return int(np.random.default_rng([seed, iteration, index, _TAG_SEED]).integers(0, 2**31 - 1))


@dataclass(frozen=True)
class Completion:
    """What a sampler returns per prompt: generated ids without the stopping eos."""

    ids: list
    stopped_on_eos: bool


# sampler(model, prompts, seeds, *, temperature, max_new_tokens, eos_id) -> list[Completion];
# collective over the model's TP x PP group (identical arguments on those ranks).
Sampler = Callable[..., list]


def megatron_sampler(*, vocab_size: int) -> Sampler:
    """The project's Megatron-Core generation (megatron_csd.generation) as a :data:`Sampler`."""

    def sample(model, prompts, seeds, *, temperature, max_new_tokens, eos_id):
        from megatron_csd.generation import GenerationRequest, SamplingParams, generate

        params = SamplingParams(greedy=False, temperature=float(temperature), top_k=0, top_p=1.0,
                                max_new_tokens=int(max_new_tokens), eos_id=eos_id)
        requests = [GenerationRequest(prompt_ids=[int(t) for t in p], seed=int(s))
                    for p, s in zip(prompts, seeds)]
        results = generate(model, requests, params, vocab_size=vocab_size)
        return [Completion(list(r.completion_ids), r.finish_reason == "eos") for r in results]

    return sample


def generated_ids(prompt_ids: Sequence[int], completion: Completion, *, budget: int,
                  eos_id: Optional[int]) -> list:
    """``prompt + completion[:budget] (+ eos if it stopped within the budget)``."""
    ids = [int(t) for t in completion.ids[:budget]]
    if completion.stopped_on_eos and eos_id is not None and len(completion.ids) < budget:
        ids.append(int(eos_id))
    return [int(t) for t in prompt_ids] + ids


def generated_sample(prompt_ids: Sequence[int], completion: Completion, *, budget: int,
                     eos_id: Optional[int], seq_length: int, pad_id: int) -> dict:
    """Training sample of :func:`generated_ids`; loss mask = exactly the generated targets."""
    from megatron_csd.data import build_training_sample

    ids = generated_ids(prompt_ids, completion, budget=budget, eos_id=eos_id)
    return build_training_sample(ids, len(prompt_ids), seq_length, pad_id)


def sample_with(sampler: Sampler, model, prompts: list, seeds: list, *, temperature: float,
                budgets: list, eos_id: Optional[int]) -> list:
    """Run ``sampler`` once for all prompts (max new tokens = the largest budget), model in eval
    mode under ``no_grad``; its train/eval mode is restored. Each completion is later cut to its
    own budget, which equals generating with that budget: the token at step k depends only on
    the request's seed, k and the prefix."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            completions = sampler(model, prompts, seeds, temperature=temperature,
                                  max_new_tokens=max(budgets), eos_id=eos_id)
    finally:
        model.train(was_training)
    if len(completions) != len(prompts):
        raise RuntimeError(f"the sampler returned {len(completions)} completions for {len(prompts)} prompts")
    return completions


class OnPolicyBatches:
    """Each step's microbatches for this DP rank, with student- or teacher-generated responses.

    Owns the run's data sampler (its ``state_dict`` is the sampler's plus ``on_policy``), so
    the trainer saves and restores it as it does the off-policy iterator.
    """

    def __init__(self, *, config, seed: int, dataset, sampler, micro_batch_size: int,
                 num_microbatches: int, dp_rank: int, dp_size: int, seq_length: int, student,
                 eos_id: Optional[int], sample_fn: Sampler, device: torch.device,
                 teacher_responses: Optional[dict] = None, dp_group=None, train_iters: int = 1,
                 lm_term=None):
        self.config = config
        self.seed = int(seed)
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = micro_batch_size * num_microbatches * dp_size
        self.seq_length = seq_length
        self.student = student
        self.eos_id = eos_id
        self.sample_fn = sample_fn
        self.device = device
        self.teacher_responses = teacher_responses
        self.dp_group, self.train_iters = dp_group, max(int(train_iters), 1)
        self.lm_term = lm_term  # lm_term.LMTerm or None
        self.buffer = None
        if config.replay_buffer_size:
            from megatron_csd.training.replay_buffer import ReplayBuffer

            self.buffer = ReplayBuffer(config.replay_buffer_size)
        self.ratio = float(config.student_data_ratio or 0.0)  # grows under the adaptive schedule
        self.reference_loss: Optional[float] = None          # DistiLLM's prev_avg_loss
        self.stats: dict = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"version": 1, "ratio": self.ratio, "reference_loss": self.reference_loss}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        if self.lm_term is not None:
            state["lm_sampler"] = self.lm_term.state_dict()
        return {**self.sampler.state_dict(), STATE_KEY: state}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict({k: v for k, v in state.items() if k != STATE_KEY})
        mine = state.get(STATE_KEY)
        if mine is None:  # an off-policy checkpoint: start the on-policy state fresh
            return
        self.ratio, self.reference_loss = float(mine["ratio"]), mine["reference_loss"]
        if self.buffer is not None and "buffer" in mine:
            self.buffer.load_state_dict(mine["buffer"])
        if self.lm_term is not None and "lm_sampler" in mine:
            self.lm_term.load_state_dict(mine["lm_sampler"])

    def observe_validation(self, record: dict) -> None:
        """DistiLLM: raise the student-sample probability when the validation CE rose by eps."""
        if not self.config.adaptive_student_data or "ce" not in record:
            return
        loss = float(record["ce"])
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + self.config.adaptive_loss_eps:
            self.ratio = min(self.ratio + self.config.adaptive_ratio_step, 1.0)
            self.reference_loss = loss

    # -------------------------------------------------------------- decisions
    def source(self, iteration: int, global_index: int, buffer_length: int) -> str:
        """DATA, FRESH (a new student sample) or BUFFER (a replay-buffer draw) for one sample.

        GKD: FRESH with probability ratio. ImitKD (buffer): BUFFER with probability ratio
        (the sample is generated and pushed first). DistiLLM (adaptive, buffer): with u < ratio
        the sample is FRESH if u < ratio (1 - iteration / train_iters) or the buffer is not
        full yet, else BUFFER.
        """
        if self.ratio <= 0.0:
            return DATA
        u = keyed_uniform(self.seed, iteration, global_index)
        if u >= self.ratio:
            return DATA
        if self.buffer is None:
            return FRESH
        if not self.config.adaptive_student_data:
            return BUFFER
        fresh = self.ratio * (1.0 - iteration / self.train_iters)
        return FRESH if u < fresh or buffer_length < self.buffer.capacity else BUFFER

    def replaced(self, iteration: int, global_index: int) -> bool:
        """Whether sample ``global_index`` of step ``iteration`` gets a student response."""
        buffer_length = len(self.buffer) if self.buffer is not None else 0
        return self.source(iteration, global_index, buffer_length) != DATA

    def _generates(self, source: str) -> bool:
        return source == FRESH or (source == BUFFER and not self.config.adaptive_student_data)

    def _draw(self) -> list:
        """This rank's (dataset index, global index in the step) per microbatch slot."""
        start = self.sampler.consumed_samples
        slots = []
        for _ in range(self.num_microbatches):
            cursor = self.sampler.consumed_samples
            indices = self.sampler.next_indices(self.micro_batch_size)
            slots.append([(index, cursor + i * self.dp_size + self.dp_rank - start)
                          for i, index in enumerate(indices)])
        return slots

    # ------------------------------------------------------------------ steps
    def step_iterator(self, iteration: int) -> tuple:
        """(iterator, count) of this step's microbatches (on ``device``); once per training step."""
        from megatron_csd.data import collate

        slots = self._draw()
        flat = [slot for micro in slots for slot in micro]
        samples = {}
        start = time.perf_counter()
        stats = {}
        if self.teacher_responses is not None:
            for index, g in flat:
                samples[(index, g)] = self._sample_from(index, self.teacher_responses[index])
            stats["teacher_samples"] = self.global_batch_size
        else:
            samples, stats = self._student_step(iteration, flat)
        generate_s = time.perf_counter() - start
        batches = []
        for micro in slots:
            items = [samples[(index, g)] if (index, g) in samples else self.dataset[index]
                     for index, g in micro]
            batches.append({k: v.to(self.device) for k, v in collate(items).items()})
        self.stats = {**stats, "generate_s": generate_s}
        if self.lm_term is not None:
            batches = self.lm_term.interleave(batches)
        return iter(batches), len(batches)

    def _student_step(self, iteration: int, flat: list) -> tuple:
        """({(index, g): sample} for this rank's student-data slots, global counts)."""
        from megatron_csd.data import build_training_sample

        buffer_length = len(self.buffer) if self.buffer is not None else 0
        sources = [self.source(iteration, g, buffer_length) for g in range(self.global_batch_size)]
        wanted = [(index, g) for index, g in flat if self._generates(sources[g])]
        generated = self._student_ids(iteration, wanted)
        if self.buffer is not None:
            self.buffer.push_gathered([(g, ids, p) for (_, g), (ids, p) in generated.items()],
                                      self.dp_group, self.dp_size)
        samples = {}
        for index, g in flat:
            if sources[g] == DATA:
                continue
            if sources[g] == BUFFER:
                ids, prompt_length = self.buffer.draw(keyed_uniform(self.seed, iteration, g, _TAG_BUFFER))
            else:
                ids, prompt_length = generated[(index, g)]
            samples[(index, g)] = build_training_sample(ids, prompt_length, self.seq_length,
                                                        self.dataset.pad_id)
        stats = {"generated_samples": sum(self._generates(s) for s in sources),
                 "student_data_ratio": self.ratio}
        if self.buffer is not None:
            stats.update(replayed_samples=sources.count(BUFFER), replay_buffer=len(self.buffer))
        return samples, stats

    def _sample_from(self, index: int, completion: Completion) -> dict:
        prompt, _ = self.dataset.prompt_and_response(index)
        return generated_sample(prompt, completion, budget=self.seq_length + 1 - len(prompt),
                                eos_id=self.eos_id, seq_length=self.seq_length,
                                pad_id=self.dataset.pad_id)

    def _student_ids(self, iteration: int, wanted: list) -> dict:
        """{(index, g): (ids, prompt_length)} sampled by the student for ``wanted``."""
        if not wanted:
            return {}
        prompts = [self.dataset.prompt_and_response(index)[0] for index, _ in wanted]
        budgets = [self.seq_length + 1 - len(p) for p in prompts]
        seeds = [keyed_seed(self.seed, iteration, g) for _, g in wanted]
        completions = sample_with(self.sample_fn, self.student, prompts, seeds,
                                  temperature=self.config.student_sample_temperature,
                                  budgets=budgets, eos_id=self.eos_id)
        return {key: (generated_ids(prompt, completion, budget=budget, eos_id=self.eos_id), len(prompt))
                for key, prompt, completion, budget in zip(wanted, prompts, completions, budgets)}


def build_on_policy(trainer, sample_fn: Optional[Sampler] = None) -> Optional[OnPolicyBatches]:
    """The trainer's on-policy batch source, or None when every on-policy option is off."""
    config = trainer.config
    if not config.on_policy.enabled:
        return None
    if config.on_policy.adaptive_student_data and (not config.training.eval_interval
                                                   or trainer.data.valid is None):
        raise ValueError("--adaptive-student-data follows the validation loss: give --valid-data "
                         "and an --eval-interval > 0")
    tokenizer = trainer.data.tokenizer
    from megatron_csd.training.lm_term import build_lm_term

    lm_term = build_lm_term(config, tokenizer, trainer.ctx, trainer.dp_size)
    if sample_fn is None:
        sample_fn = megatron_sampler(vocab_size=trainer.plan.vocab_size)
    teacher_responses = None
    if config.on_policy.teacher_generated:
        from megatron_csd.training.teacher_generated import load_or_generate

        teacher_responses = load_or_generate(trainer, sample_fn)
    return OnPolicyBatches(
        config=config.on_policy, seed=config.training.seed, dataset=trainer.data.train,
        sampler=trainer.train_batches.sampler, micro_batch_size=config.training.micro_batch_size,
        num_microbatches=trainer.num_microbatches, dp_rank=trainer.ctx.dp_rank,
        dp_size=trainer.dp_size, seq_length=config.training.seq_length, student=trainer.student,
        eos_id=tokenizer.eos_id, sample_fn=sample_fn, device=trainer.ctx.device,
        teacher_responses=teacher_responses, dp_group=trainer.ctx.dp_group,
        train_iters=config.training.train_iters, lm_term=lm_term)
