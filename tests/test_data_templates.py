"""Prompt templates render exactly the documented strings."""
import pytest

from megatron_csd.data.records import InstructionRecord
from megatron_csd.data.templates import TEMPLATE_NAMES, render

WITH_CONTEXT = InstructionRecord(instruction="Summarise the text.", context="Cats sleep a lot.",
                                 response="Cats are sleepy.")
NO_CONTEXT = InstructionRecord(instruction="Name a colour.", response="Blue.")


def test_dolly_template_with_context_exact():
    rendered = render(WITH_CONTEXT, "dolly")
    assert rendered.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise the text.\n\n### Input:\nCats sleep a lot.\n\n### Response:\n")
    assert rendered.prompt_tail == "\n\n### Response:\n"
    assert rendered.response == "Cats are sleepy."


def test_dolly_template_without_context_exact():
    rendered = render(NO_CONTEXT, "dolly")
    assert rendered.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert rendered.response == "Blue."


def test_gemma_chat_template_exact():
    rendered = render(WITH_CONTEXT, "gemma-chat")
    assert rendered.prompt == ("<start_of_turn>user\nSummarise the text.\n\nCats sleep a lot.<end_of_turn>\n"
                               "<start_of_turn>model\n")
    assert rendered.prompt_tail == "<end_of_turn>\n<start_of_turn>model\n"
    assert rendered.response == "Cats are sleepy.<end_of_turn>"
    assert render(NO_CONTEXT, "gemma-chat").prompt == (
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n")


def test_unknown_template_is_value_error():
    assert set(TEMPLATE_NAMES) == {"dolly", "gemma-chat"}
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'.*dolly"):
        render(NO_CONTEXT, "alpaca")
