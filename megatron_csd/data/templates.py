"""Prompt templates: an instruction record -> (prompt head, prompt tail, response) texts.

The prompt is split in two so truncation can shorten the part that carries content (the head:
preamble, instruction, context) while the tail that tells the model to answer ("### Response:",
Gemma's "<start_of_turn>model") is never cut.

`dolly` (the Alpaca prompt used for Dolly in MiniLLM / DistiLLM):

    Below is an instruction that describes a task[, paired with an input that provides further
    context]. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    [### Input:
    {context}

    ]### Response:
    {response}

`gemma-chat` (Gemma -IT turn format; context appended to the user turn after a blank line):

    <start_of_turn>user
    {instruction}[\n\n{context}]<end_of_turn>
    <start_of_turn>model
    {response}<end_of_turn>

The tokenizer adds bos before the prompt and eos after the response (see samples.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_csd.data.records import InstructionRecord

_DOLLY_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
_DOLLY_PREAMBLE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input "
                              "that provides further context. "
                              "Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class RenderedRecord:
    prompt_head: str
    prompt_tail: str
    response: str

    @property
    def prompt(self) -> str:
        return self.prompt_head + self.prompt_tail


def _render_dolly(record: InstructionRecord) -> RenderedRecord:
    if record.context:
        head = (f"{_DOLLY_PREAMBLE_WITH_INPUT}### Instruction:\n{record.instruction}\n\n"
                f"### Input:\n{record.context}")
    else:
        head = f"{_DOLLY_PREAMBLE}### Instruction:\n{record.instruction}"
    return RenderedRecord(head, "\n\n### Response:\n", record.response)


def _render_gemma_chat(record: InstructionRecord) -> RenderedRecord:
    user_text = record.instruction
    if record.context:
        user_text = f"{user_text}\n\n{record.context}"
    return RenderedRecord(f"<start_of_turn>user\n{user_text}",
                          "<end_of_turn>\n<start_of_turn>model\n",
                          f"{record.response}<end_of_turn>")


_TEMPLATES = {"dolly": _render_dolly, "gemma-chat": _render_gemma_chat}
TEMPLATE_NAMES = tuple(_TEMPLATES)


def check_template(name: str) -> None:
    if name not in _TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {list(TEMPLATE_NAMES)}")


def render(record: InstructionRecord, template: str) -> RenderedRecord:
    check_template(template)
    return _TEMPLATES[template](record)
