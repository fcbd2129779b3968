"""Take a GPTModel's final hidden states and output weight instead of its logits.

Megatron's ``GPTModel._postprocess`` calls ``self.output_layer(hidden, weight=output_weight)``
(a ``tensor_parallel.ColumnParallelLinear`` with both the local and the Transformer-Engine layer
spec) after the final norm; ``output_weight`` is the word embedding when the heads are tied and
the stage holds the embedding (PP = 1), else ``None`` (the layer's own weight: untied, or the
last stage's copy of a tied embedding whose gradient ``finalize_model_grads`` all-reduces with
the first stage's). :class:`OutputCapture` replaces that layer's ``forward`` on one model
instance: while the capture is active (``with capture.active():``, which the training stage
enters around its forward) the call records ``HeadInputs`` and returns an empty ``[s, b, 0]``
placeholder, so the model never forms the ``[s, b, V/TP]`` logits and the fused loss can form
them chunk by chunk. Outside it (generation for on-policy samples or evaluation) the layer runs
as before and returns logits. The hidden states are as the layer receives them: sequence-sharded ``[s/TP, b, h]``
under sequence parallelism, else ``[s, b, h]``.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch


class HeadInputs(NamedTuple):
    """What the output layer would have used: hidden states, weight shard and its layout."""

    hidden: torch.Tensor            # [s(/TP), b, h] after the final norm
    weight: torch.Tensor            # [V_pad / TP, h]
    sequence_parallel: bool         # hidden is sequence-sharded over tp_group
    tp_group: object                # the layer's tensor-parallel group (None: TP 1)


def fused_head_problem(model) -> Optional[str]:
    """Why ``model``'s output layer cannot be captured, or None when it can."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return "the model has no output layer (not the last pipeline stage)"
    if getattr(model.config, "mtp_num_layers", None):
        return "multi-token prediction reuses the output layer"
    if getattr(layer, "bias", None) is not None:
        return "the output layer has a bias"
    if getattr(layer, "gather_output", False):
        return "the output layer gathers its output (parallel_output=False)"
    return None


class OutputCapture:
    """Installed on one GPTModel (last stage); ``take()`` returns the last call's HeadInputs."""

    def __init__(self, model):
        problem = fused_head_problem(model)
        if problem is not None:
            raise ValueError(f"the fused output-layer loss cannot be used: {problem}; "
                             "run with --fused-output-loss false")
        self._layer = model.output_layer
        self._original_forward = self._layer.forward
        self._active = False
        self._captured: Optional[HeadInputs] = None
        self._layer.forward = self._capture  # instance attribute: nn.Module.__call__ finds it

    @contextlib.contextmanager
    def active(self, enabled: bool = True):
        """Capture the layer's inputs inside the block (else the layer computes logits)."""
        previous, self._active = self._active, enabled
        try:
            yield self
        finally:
            self._active = previous

    def _capture(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        if not self._active:
            return self._original_forward(input_, weight=weight,
                                          runtime_gather_output=runtime_gather_output, **kwargs)
        layer = self._layer
        weight = layer.weight if weight is None else weight
        if self._captured is not None:
            raise RuntimeError("output layer called twice without take(): the fused loss lost a microbatch")
        self._captured = HeadInputs(input_, weight, bool(layer.sequence_parallel),
                                    getattr(layer, "tp_group", None))
        return input_.new_empty(input_.shape[0], input_.shape[1], 0), None

    def take(self) -> HeadInputs:
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("the model's output layer did not run (no HeadInputs captured)")
        return captured
