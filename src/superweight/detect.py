"""Data-free detection of super weights from one forward pass per step.

A super weight ``W[row, col]`` of a layer's MLP down-projection multiplies a large input
activation in channel ``col`` and writes a huge output, the super activation, into
channel ``row``. Detection hooks every down-projection and records, per layer, the
largest ``|output|`` with its token and channel, and the largest ``|input|`` at that
token with its channel.

Candidate rule: a layer is a candidate when its largest ``|output|`` (what enters the
residual stream) is at least ``spike_ratio`` times the median of that value over all
layers, and at least ``min_spike``. Its super weight is ``[output channel, input
channel]``, where the input channel is the one contributing most to the spike. Found weights are zeroed and the pass repeated, because other super weights
appear once the first is gone. Every weight is restored at the end.

Not every spike is a super weight (Llama-7B's layer 30 spikes and is not one). Each
candidate carries evidence: its depth, and whether its channel stays the largest in the
residual stream over the following layers. ``verify=True`` adds the causal test, which
measures perplexity on a short built-in text with that weight zeroed, relative to the
original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from superweight.adapters import Adapter, get_adapter
from superweight.coordinates import SuperWeight
from superweight.interventions import pruned_super_weights

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."

# Original English text for the causal check; short, so a verification costs one
# forward pass of a few hundred tokens per candidate.
VERIFY_TEXT = (
    "The river town grew up around a wooden bridge that farmers used to bring grain to "
    "the weekly market. In the spring, when the snow melted in the hills, the water rose "
    "quickly and the old bridge often had to be closed for several days. The town council "
    "argued for years about building a stone bridge, because the cost was high and the "
    "budget was small. In the end a local engineer proposed a simple plan: the new bridge "
    "would be built in stages over three summers, and each stage would be paid for by a "
    "small toll on the carts that crossed it. The first summer the workers laid the "
    "foundations on both banks. The second summer they raised the arches, and children "
    "came every evening to watch the cranes lift the heavy blocks into place. By the end "
    "of the third summer the bridge was finished, and the toll was removed a year later, "
    "once the debt had been paid. The market doubled in size within a decade, and people "
    "from the neighboring valleys began to settle in the town. Today the stone bridge is "
    "still in use. A small museum near the river tells its story with photographs, tools "
    "and letters written by the engineer, who described the project as the most useful "
    "thing he had ever built. Visitors often remark that the bridge looks older than it "
    "is, since the stone came from the same quarry as the church on the hill."
)


class NumericalOverflowError(FloatingPointError):
    """A hooked activation became inf or NaN, typically float16 overflowing."""


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """Settings of :func:`detect_super_weights`."""

    prompt: str = DEFAULT_PROMPT
    """Text fed to the model. Any text works; the default is the prompt of Yu et al. (2024)."""
    max_iterations: int = 3
    """Forward passes: after each, found weights are zeroed and the pass repeated."""
    spike_ratio: float = 50.0
    """A layer is a candidate when its max |output| is at least this many times the
    median over layers."""
    min_spike: float = 20.0
    """...and at least this large in absolute terms."""
    verify: bool = False
    """Run the causal test: perplexity on built-in text with each candidate zeroed."""
    confirm_ratio: float = 2.0
    """Perplexity ratio at or above which a verified candidate is confirmed."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt is empty; pass some text, e.g. --prompt 'Apple Inc. is a worldwide tech company.'")
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ValueError(f"max_iterations={self.max_iterations!r} is invalid; use an integer >= 1")
        for name in ("spike_ratio", "min_spike", "confirm_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid; use a finite number > 0")


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Largest down-projection activations of one layer in one forward pass."""

    layer: int
    max_output: float
    """max |output| of the down-projection, at ``(token, output_channel)``."""
    output_channel: int
    token: int
    max_input: float
    """max |input| at ``token``, at ``input_channel``."""
    input_channel: int
    row: int
    """Output channel of the spike that enters the residual stream: ``output_channel``,
    or ``residual_channel`` where a norm follows the down-projection."""
    col: int
    """Input channel with the largest contribution ``|W[row, col] * x[spike_token, col]|``
    to that spike; the super weight's column."""
    spike_token: int
    super_activation: float
    """Signed down-projection output at ``[spike_token, row]``."""
    input_activation: float
    """Signed down-projection input at ``[spike_token, col]``."""
    residual_max_output: float | None = None
    """For architectures that normalize the MLP output (Gemma 2/3, OLMo 2): max |output|
    of that norm, i.e. what enters the residual stream, at ``(residual_token,
    residual_channel)``."""
    residual_channel: int | None = None
    residual_token: int | None = None

    @property
    def spike(self) -> float:
        """The value the candidate rule reads: what enters the residual stream."""
        return self.max_output if self.residual_max_output is None else self.residual_max_output

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A detected super weight with the evidence for and against it."""

    super_weight: SuperWeight
    module: str
    value: float
    """The weight's value."""
    super_activation: float
    """Signed down-projection output at ``[token, row]``."""
    input_activation: float
    """Signed down-projection input at ``[token, col]``."""
    token: int
    token_text: str
    iteration: int
    depth: float
    """``layer / (num_layers - 1)``: 0 for the first layer, 1 for the last."""
    persistence: float | None
    """Fraction of the following layers whose residual stream at ``token`` has its
    largest |value| in channel ``row``; ``None`` for the last layer."""
    residual_activation: float | None = None
    perplexity_ratio: float | None = None
    """Perplexity on the built-in text with this weight zeroed, over the original."""
    group_perplexity_ratio: float | None = None
    """The same with every candidate of this layer and row zeroed."""
    marginal_perplexity_ratio: float | None = None
    """Group ratio over the ratio of the group without this weight."""
    status: str = "unverified"
    """``unverified``, ``confirmed`` (own or marginal ratio >= confirm_ratio) or ``rejected``."""

    @property
    def layer(self) -> int:
        return self.super_weight.layer

    def to_dict(self) -> dict[str, Any]:
        out = {**self.super_weight.to_dict()}
        out.update({k: v for k, v in dataclasses.asdict(self).items() if k != "super_weight"})
        return out


@dataclasses.dataclass
class DetectionReport:
    """Result of :func:`detect_super_weights`: candidates and per-pass layer statistics."""

    config: DetectionConfig
    candidates: list[Candidate]
    steps: list[list[LayerStats]]
    """Per iteration, per layer statistics. ``steps[0]`` is the unedited model."""
    num_layers: int
    model_type: str
    weight_layout: str
    base_perplexity: float | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    directory: dict[str, Any] | None = None

    @property
    def layers(self) -> list[LayerStats]:
        return self.steps[0]

    @property
    def super_weights(self) -> list[SuperWeight]:
        """Confirmed super weights when verified, otherwise every candidate."""
        if self.config.verify:
            return [c.super_weight for c in self.candidates if c.status == "confirmed"]
        return [c.super_weight for c in self.candidates]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.provenance.get("model"),
            # The property's list (confirmed ones once verified); each candidate in full below.
            "super_weights": [sw.to_dict() for sw in self.super_weights],
            "candidates": [c.to_dict() for c in self.candidates],
            "layers": [s.to_dict() for s in self.layers],
            "iterations": [[s.to_dict() for s in step] for step in self.steps],
            "num_layers": self.num_layers,
            "model_type": self.model_type,
            "coordinates": "nn.Linear convention: row = output channel, col = input channel"
            + (" (GPT-2 Conv1D stores the transpose, weight[col, row])" if self.weight_layout == "conv1d" else ""),
            "base_perplexity": self.base_perplexity,
            "directory": self.directory,
            "config": dataclasses.asdict(self.config),
            "provenance": self.provenance,
        }


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _LayerRecorder:
    """Forward hooks that keep only per-layer maxima, never whole activations."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        self.model = model
        self.adapter = adapter
        self.num_layers = adapter.num_layers(model)
        self.down: dict[int, tuple[torch.Tensor, ...]] = {}
        self.residual: dict[int, tuple[torch.Tensor, ...]] = {}
        self.spike: dict[int, tuple[torch.Tensor, ...]] = {}
        self._pending: tuple[torch.Tensor, ...] | None = None
        self.first_nonfinite: str | None = None

    def _down_hook(self, layer: int, has_residual_module: bool):
        def hook(module, args, output):
            # Batch of one; OPT flattens [batch, tokens] before fc2, so reshape to [tokens, channels].
            x = args[0].reshape(-1, args[0].shape[-1])
            y = output if isinstance(output, torch.Tensor) else output[0]
            y = y.reshape(-1, y.shape[-1])
            self._check_finite(y, layer, "down-projection output")
            self._check_finite(x, layer, "down-projection input")
            token, channel = _argmax_2d(y.abs())
            in_channel = x[token].abs().argmax()
            self.down[layer] = (token, channel, y[token, channel], in_channel, x[token, in_channel])
            if has_residual_module:
                # The residual hook of this layer runs next and reads the spike there.
                self._pending = (module.weight, x, y)
            else:
                self.spike[layer] = self._super_weight_at(module.weight, x, y, token, channel)

        return hook

    def _residual_hook(self, layer: int):
        def hook(module, args, output):
            r = output.reshape(-1, output.shape[-1])
            self._check_finite(r, layer, "residual output")
            token, channel = _argmax_2d(r.abs())
            self.residual[layer] = (token, channel, r[token, channel])
            weight, x, y = self._pending
            self._pending = None
            self.spike[layer] = self._super_weight_at(weight, x, y, token, channel)

        return hook

    def _super_weight_at(self, weight, x, y, token, row) -> tuple[torch.Tensor, ...]:
        # The column is the input channel that contributes most to the spike,
        # |W[row, col] * x[token, col]|. It is the max-|input| channel unless that weight
        # is small or already zeroed by an earlier iteration.
        weight_row = weight[:, row] if self.adapter.layout == "conv1d" else weight[row]
        col = (weight_row * x[token]).abs().argmax()
        return (token, row, col, y[token, row], x[token, col])

    def _check_finite(self, tensor: torch.Tensor, layer: int, what: str) -> None:
        if self.first_nonfinite is None and not torch.isfinite(tensor.abs().amax()):
            self.first_nonfinite = f"layer {layer} {what}"

    def run(self, input_ids: torch.Tensor) -> tuple[list[LayerStats], tuple[torch.Tensor, ...]]:
        handles = []
        for layer in range(self.num_layers):
            residual = self.adapter.residual_output_module(self.model, layer)
            down_proj = self.adapter.down_proj_module(self.model, layer)
            handles.append(down_proj.register_forward_hook(self._down_hook(layer, residual is not None)))
            if residual is not None:
                handles.append(residual.register_forward_hook(self._residual_hook(layer)))
        with _hooks(handles), torch.inference_mode():
            self.down.clear()
            self.residual.clear()
            self.spike.clear()
            self.first_nonfinite = None
            outputs = self.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        if self.first_nonfinite is not None:
            dtype = next(self.model.parameters()).dtype
            raise NumericalOverflowError(
                f"{self.first_nonfinite} contains inf or NaN in {dtype}: super activations reach "
                "tens of thousands and overflow float16; load the model with --dtype bfloat16 or float32"
            )
        self._pending = None
        missing = [layer for layer in range(self.num_layers) if layer not in self.spike]
        if missing:
            raise RuntimeError(f"down-projection hooks of layers {missing} did not run; check the adapter")
        return [self._stats(layer) for layer in range(self.num_layers)], outputs.hidden_states

    def _stats(self, layer: int) -> LayerStats:
        token, channel, out_value, in_channel, in_value = (t.item() for t in self.down[layer])
        spike_token, row, col, super_activation, input_activation = (t.item() for t in self.spike[layer])
        residual = {}
        if layer in self.residual:
            r_token, r_channel, r_value = (t.item() for t in self.residual[layer])
            residual = dict(residual_max_output=abs(r_value), residual_channel=int(r_channel), residual_token=int(r_token))
        return LayerStats(
            layer=layer, max_output=abs(out_value), output_channel=int(channel), token=int(token),
            max_input=abs(in_value), input_channel=int(in_channel), row=int(row), col=int(col),
            spike_token=int(spike_token), super_activation=super_activation,
            input_activation=input_activation, **residual,
        )


def _argmax_2d(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(row, column)`` of the largest entry of a 2-D tensor, as 0-d tensors."""
    flat_index = values.argmax()
    return flat_index // values.shape[-1], flat_index % values.shape[-1]


def _candidates_in(stats: list[LayerStats], config: DetectionConfig) -> list[LayerStats]:
    median = statistics.median(s.spike for s in stats)
    threshold = max(config.spike_ratio * median, config.min_spike)
    return [s for s in stats if s.spike >= threshold]


def _persistence(hidden_states: tuple[torch.Tensor, ...], layer: int, token: int, row: int) -> float | None:
    # hidden_states[i + 1] is the residual stream after layer i.
    later = hidden_states[layer + 2 :]
    if not later:
        return None
    hits = sum(int(h[0, token].abs().argmax().item() == row) for h in later)
    return hits / len(later)


@torch.inference_mode()
def text_perplexity(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Return the perplexity of one sequence ``input_ids`` of shape ``[1, tokens]``."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:])
    return math.exp(loss.item())


def detect_super_weights(
    model: nn.Module, tokenizer: Any, config: DetectionConfig | None = None, **overrides: Any
) -> DetectionReport:
    """Find super weight candidates from forward passes on ``config.prompt``.

    The model is left bit-identical: found weights are zeroed between passes and
    restored before this returns, also on error. Keyword ``overrides`` replace fields
    of ``config``, e.g. ``detect_super_weights(model, tok, verify=True)``.
    """
    config = dataclasses.replace(config or DetectionConfig(), **overrides)
    adapter = get_adapter(model)
    recorder = _LayerRecorder(model, adapter)
    device = next(model.parameters()).device
    input_ids = tokenizer(config.prompt, return_tensors="pt").input_ids.to(device)
    if input_ids.shape[1] == 0:
        raise ValueError(f"prompt {config.prompt!r} tokenizes to no tokens; use a longer prompt")

    candidates: list[Candidate] = []
    found: set[SuperWeight] = set()
    steps: list[list[LayerStats]] = []
    for iteration in range(config.max_iterations):
        with pruned_super_weights(model, found, adapter):
            stats, hidden_states = recorder.run(input_ids)
        steps.append(stats)
        new = []
        for s in _candidates_in(stats, config):
            sw = SuperWeight(s.layer, s.row, s.col)
            if sw in found:
                continue
            new.append(sw)
            weight = adapter.down_proj_module(model, s.layer).weight
            candidates.append(
                Candidate(
                    super_weight=sw,
                    module=adapter.down_proj_name(model, s.layer),
                    value=weight[adapter.weight_index(sw.row, sw.col)].item(),
                    super_activation=s.super_activation,
                    input_activation=s.input_activation,
                    token=s.spike_token,
                    token_text=tokenizer.convert_ids_to_tokens(int(input_ids[0, s.spike_token])),
                    iteration=iteration,
                    depth=s.layer / max(recorder.num_layers - 1, 1),
                    persistence=_persistence(hidden_states, s.layer, s.spike_token, sw.row),
                    residual_activation=s.residual_max_output,
                )
            )
        log.info("iteration %d: %d new candidate(s) %s", iteration, len(new), [str(sw) for sw in new])
        if not new:
            break
        found.update(new)

    base_perplexity = None
    if config.verify and candidates:
        candidates, base_perplexity = _verify(model, tokenizer, adapter, candidates, config, device)
    return DetectionReport(
        config=config, candidates=candidates, steps=steps, num_layers=recorder.num_layers,
        model_type=model.config.model_type, weight_layout=adapter.layout, base_perplexity=base_perplexity,
    )


def _verify(model, tokenizer, adapter, candidates, config, device):
    """Attach the causal evidence to each candidate.

    Super weights can come in redundant groups: in SmolLM2-135M two weights of layer 11
    feed the same super activation, and zeroing either alone raises perplexity by x3.6
    and x1.06 while zeroing both raises it by x3,000. So each candidate gets its own
    ratio, the ratio of its group (all candidates with the same layer and row), and its
    marginal ratio: the group zeroed against the group zeroed without it. A candidate is
    confirmed when its own or its marginal ratio reaches ``config.confirm_ratio``.
    """
    input_ids = tokenizer(VERIFY_TEXT, return_tensors="pt").input_ids.to(device)
    base = text_perplexity(model, input_ids)

    def ratio(super_weights) -> float:
        with pruned_super_weights(model, super_weights, adapter):
            return text_perplexity(model, input_ids) / base

    groups: dict[tuple[int, int], list[SuperWeight]] = {}
    for candidate in candidates:
        sw = candidate.super_weight
        groups.setdefault((sw.layer, sw.row), []).append(sw)
    group_ratio = {key: ratio(members) for key, members in groups.items()}

    verified = []
    for candidate in candidates:
        sw = candidate.super_weight
        members = groups[(sw.layer, sw.row)]
        alone = ratio([sw])
        if len(members) == 1:
            marginal = alone
        else:
            marginal = group_ratio[(sw.layer, sw.row)] / ratio([m for m in members if m != sw])
        confirmed = max(alone, marginal) >= config.confirm_ratio
        verified.append(
            dataclasses.replace(
                candidate,
                perplexity_ratio=alone,
                group_perplexity_ratio=group_ratio[(sw.layer, sw.row)],
                marginal_perplexity_ratio=marginal,
                status="confirmed" if confirmed else "rejected",
            )
        )
        log.info(
            "verify %s: perplexity x%.3g alone, x%.3g marginal in its group -> %s",
            sw, alone, marginal, verified[-1].status,
        )
    verified.sort(key=lambda c: (-c.group_perplexity_ratio, -max(c.perplexity_ratio, c.marginal_perplexity_ratio)))
    return verified, base
