"""How much a quantized model lost: perplexity, KL divergence and top-1 agreement against
its float original on a text, or, for encoders, the cosine similarity of their outputs.

Both models read the same token windows. Every token of the text (but the first) is scored
once; a window scores `stride` new tokens after the ones before them as context, so a
stride shorter than the window gives every token more context at more cost.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantcli.checkpoint import EVAL_NAME
from quantcli.errors import UsageError
from quantcli.files import atomic_path
from quantcli.models.generation import context_length

DEFAULT_TEXT = "tinyshakespeare.txt"


@dataclass
class EvalResult:
    """What `quantcli eval` measured; saved as quantcli_eval.json beside the checkpoint."""

    model: str
    text: str
    tokens: int  # scored positions
    window: int
    stride: int
    dtype: str
    seconds: float
    perplexity: float | None = None
    baseline: str | None = None
    baseline_perplexity: float | None = None
    kl_divergence: float | None = None  # mean KL(baseline || model) per token, in nats
    top1_agreement: float | None = None  # share of positions with the same likeliest token
    cosine_similarity: float | None = None  # encoders: mean over tokens of the outputs'
    scheme: str | None = None  # "int4 asym g32", or "float": what was scored, for plots
    size_bytes: int | None = None  # the scored model's weights on disk

    @property
    def delta_perplexity(self) -> float | None:
        if self.perplexity is None or self.baseline_perplexity is None:
            return None
        return self.perplexity - self.baseline_perplexity

    @property
    def delta_perplexity_percent(self) -> float | None:
        delta = self.delta_perplexity
        return None if delta is None else 100 * delta / self.baseline_perplexity

    def to_dict(self) -> dict:
        data = asdict(self)
        data["delta_perplexity"] = self.delta_perplexity
        data["delta_perplexity_percent"] = self.delta_perplexity_percent
        return {key: value for key, value in data.items() if value is not None}


def default_text() -> tuple[str, str]:
    """(name, content) of the text shipped with quantcli."""
    content = resources.files("quantcli.data").joinpath(DEFAULT_TEXT).read_text("utf-8")
    return f"{DEFAULT_TEXT} (shipped, public domain)", content


def is_causal_lm(model: nn.Module) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)()) and not getattr(
        model.config, "is_encoder_decoder", False
    )


def evaluate(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    text_name: str,
    model_name: str,
    baseline: nn.Module | None = None,
    baseline_name: str | None = None,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = 16384,
    on_start: Callable[[int], None] | None = None,
    on_window: Callable[[], None] | None = None,
) -> EvalResult:
    """Score `model` (and `baseline`, on the same windows) on `text`."""
    started = time.perf_counter()
    causal = is_causal_lm(model)
    if not causal and baseline is None:
        raise UsageError(
            f"{type(model).__name__} is not a causal language model, so it has no perplexity: "
            "pass --baseline to compare its outputs with the float model's."
        )
    window = min(window, context_length(model) or window)
    if window < 2 or (stride is not None and stride < 1):
        raise UsageError("--window must be at least 2 tokens and --stride at least 1.")
    stride = min(stride or window, window - 1)  # each window keeps a token of context
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UsageError("the text has fewer than 2 tokens: give a longer text.")
    spans = list(_windows(len(ids), window, stride))
    if on_start:
        on_start(len(spans))
    device = next(iter(model.buffers())).device
    totals = _Totals()
    with torch.no_grad():
        for begin, end, first_scored in spans:
            chunk = ids[begin:end].unsqueeze(0).to(device)
            if causal:
                totals.add_causal(model, baseline, chunk, first_scored - begin)
            else:
                totals.add_encoder(model, baseline, chunk)
            if on_window:
                on_window()
    dtype = next((b.dtype for b in model.buffers() if b.is_floating_point()), torch.float32)
    return EvalResult(
        model=model_name,
        text=text_name,
        tokens=totals.count,
        window=window,
        stride=stride,
        dtype=str(dtype).removeprefix("torch."),
        seconds=time.perf_counter() - started,
        baseline=baseline_name if baseline is not None else None,
        **totals.metrics(causal, baseline is not None),
    )


def _windows(n: int, window: int, stride: int):
    """(begin, end, first scored position) of each window: every position from 1 is scored
    exactly once, each window scoring up to `stride` new positions after as much context
    as fits in `window` tokens."""
    scored_from = 1
    while scored_from < n:
        end = min(scored_from + stride, n)
        yield max(0, end - window), end, scored_from
        scored_from = end


class _Totals:
    """Running sums over the scored positions."""

    def __init__(self) -> None:
        self.count = 0
        self.nll = 0.0
        self.baseline_nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.cosine = 0.0

    def add_causal(self, model, baseline, chunk, first: int) -> None:
        targets = chunk[0, first:]
        logp = _log_probs(model, chunk, first)
        self.nll += float(F.nll_loss(logp, targets, reduction="sum"))
        self.count += len(targets)
        if baseline is not None:
            base = _log_probs(baseline, chunk, first)
            self.baseline_nll += float(F.nll_loss(base, targets, reduction="sum"))
            self.kl += float(F.kl_div(logp, base, log_target=True, reduction="sum"))
            self.agree += int((logp.argmax(-1) == base.argmax(-1)).sum())

    def add_encoder(self, model, baseline, chunk) -> None:
        ours, theirs = _last_hidden(model, chunk), _last_hidden(baseline, chunk)
        self.cosine += float(F.cosine_similarity(ours, theirs, dim=-1).sum())
        self.count += ours.shape[0]

    def metrics(self, causal: bool, compared: bool) -> dict:
        if not causal:
            return {"cosine_similarity": self.cosine / self.count}
        found = {"perplexity": math.exp(self.nll / self.count)}
        if compared:
            found.update(
                baseline_perplexity=math.exp(self.baseline_nll / self.count),
                kl_divergence=self.kl / self.count,
                top1_agreement=self.agree / self.count,
            )
        return found


def _log_probs(model, chunk: torch.Tensor, first: int) -> torch.Tensor:
    """Float32 log-probabilities of the tokens at positions `first`.. of the chunk."""
    logits = model(input_ids=chunk).logits[0, first - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def _last_hidden(model, chunk: torch.Tensor) -> torch.Tensor:
    """The last hidden state of every token (the encoder's, for encoder-decoders)."""
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
    output = encoder(input_ids=chunk, output_hidden_states=True)
    return output.hidden_states[-1][0].float()


def save_result(folder: Path, result: EvalResult) -> Path:
    """Write the result into the checkpoint folder, atomically (push reads it for the card)."""
    target = folder / EVAL_NAME
    with atomic_path(target) as temporary:
        temporary.write_text(json.dumps(result.to_dict(), indent=2))
    return target
