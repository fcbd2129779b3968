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
from typing import Optional

import torch

from megatron_csd.training.generated_samples import (_TAG_BUFFER, Completion, Sampler,
                                                     generated_ids, generated_sample, keyed_seed,
                                                     keyed_uniform, megatron_sampler, sample_with)

STATE_KEY = "on_policy"
DATA, FRESH, BUFFER = "data", "fresh", "buffer"  # where a sample's response comes from


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
    config, on_policy = trainer.config, trainer.config.on_policy
    if not on_policy.enabled:
        return None
    if on_policy.adaptive_student_data and (not config.training.eval_interval
                                                   or trainer.data.valid is None):
        raise ValueError("--adaptive-student-data follows the validation loss: give --valid-data "
                         "and an --eval-interval > 0")
    generates = (on_policy.student_data_ratio is not None or on_policy.adaptive_student_data
                 or on_policy.teacher_generated)
    if generates and config.parallel.sequence_parallel:
        raise ValueError("generation (--student-data-ratio, --adaptive-student-data, --teacher-generated) "
                         "does not run with --sequence-parallel yet; drop --sequence-parallel")
    tokenizer = trainer.data.tokenizer
    from megatron_csd.training.lm_term import build_lm_term

    lm_term = build_lm_term(config, tokenizer, trainer.ctx, trainer.dp_size)
    if sample_fn is None:
        sample_fn = megatron_sampler(vocab_size=trainer.plan.vocab_size,
                                     decodable_vocab_size=tokenizer.vocab_size)
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
