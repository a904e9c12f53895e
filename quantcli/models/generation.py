"""Text generation with a loaded model: prompt formatting, streaming and timing."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from quantcli.errors import CheckpointError, UsageError, first_line
from quantcli.models.source import check_tokenizer_file


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    max_new_tokens: int  # after capping to the model's context
    first_token_seconds: float  # the prompt's prefill, up to the first new token
    compile_seconds: float = 0.0  # with `compile`: the warm-up run that compiled, apart

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, per second: the speed of the decode steps alone."""
        decode = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0


class _FirstTokenClock:
    """A streamer that notes when the first new token arrives and passes everything on.

    `generate` first puts the prompt, then each new token."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class _StopAfter:
    """A stopping criterion: end generation after `tokens` new tokens (a warm-up run)."""

    def __init__(self, prompt_tokens: int, tokens: int) -> None:
        self.length = prompt_tokens + tokens

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = input_ids.shape[1] >= self.length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """Whether the prompt goes through the chat template: when asked, or by default when
    the tokenizer has one."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def load_tokenizer(folder):
    """The model's tokenizer; a tokenizer.json that is no tokenizer is refused by name.

    transformers trusts the file's structure (JSON without 'added_tokens' is a KeyError
    deep inside it), so the file is first parsed by the `tokenizers` library, strictly.
    """
    from transformers import AutoTokenizer

    check_tokenizer_file(folder)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - reading local files runs none of ours
        raise CheckpointError(
            f"{folder} has no usable tokenizer ({type(error).__name__}: {first_line(error)}): "
            "check its tokenizer files."
        ) from None


def _apply_chat_template(tokenizer, messages: list[dict]) -> dict:
    """The chat prompt's tensors. A template that refuses the conversation on purpose
    (``raise_exception``: say, no system role) is a usage error; one that is broken
    (syntax, a missing variable) is the checkpoint's."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    except TemplateError as error:
        if type(error) is TemplateError:  # what the template's raise_exception raises
            raise UsageError(
                f"the model's chat template refuses this prompt ({first_line(error)}): "
                "change it (drop --system?) or use --no-chat."
            ) from None
        raise CheckpointError(
            f"the model's chat template is broken ({type(error).__name__}: "
            f"{first_line(error)}): fix chat_template.jinja or tokenizer_config.json, or use "
            "--no-chat."
        ) from None


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    seed: int | None = None,
    chat: bool | None = None,
    system: str | None = None,
    streamer=None,
    compile: bool = False,
) -> GenerationResult:
    """Continue `prompt` (as a chat turn when the tokenizer has a template and `chat` allows).

    `compile`: a static KV cache and `torch.compile` of the decode step. It removes most
    of the Python and small-op overhead around the layers (about 2x the decode speed of
    SmolLM2-135M on 2 CPU cores) but costs tens of seconds of compilation first, so it
    pays off only for long generations or a warm compile cache.
    """
    if not prompt.strip():
        raise UsageError("the prompt is empty: pass some text, or - to read it from stdin.")
    check_generates_text(model)
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1.")
    use_chat = uses_chat(tokenizer, chat)
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError("this tokenizer has no chat template: use --no-chat.")
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        inputs = _apply_chat_template(tokenizer, messages)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    device = next(iter(model.buffers())).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    prompt_tokens = inputs["input_ids"].shape[1]
    if not prompt_tokens:
        if use_chat:
            raise CheckpointError(
                "the model's chat template turns the prompt into nothing: fix the template "
                "(chat_template.jinja or tokenizer_config.json), or use --no-chat."
            )
        raise UsageError("the prompt gives no tokens with this tokenizer: pass some text.")
    context = context_length(model)
    # an encoder-decoder reads the prompt in its encoder; its output starts with the decoder's
    # start token and holds the new tokens only (a decoder-only one continues the prompt)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    kept = 1 if encoder_decoder else prompt_tokens
    if context is not None:
        if prompt_tokens > context or (prompt_tokens == context and not encoder_decoder):
            raise UsageError(
                f"the prompt has {prompt_tokens} tokens; the model reads at most {context}."
            )
        max_new_tokens = min(max_new_tokens, context - kept)
    if seed is not None:
        torch.manual_seed(seed)
    # one beam: what --greedy and --do-sample mean, and what streaming takes (FSMT's
    # generation_config asks for beam search, which refuses a streamer: exit 1)
    options = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "num_beams": 1}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy: no sampling settings, so generation_config defaults do not warn
        options.update(temperature=None, top_p=None, top_k=None)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        options["pad_token_id"] = tokenizer.eos_token_id
    compile_seconds = 0.0
    if compile:
        options.update(compile_options(device.type))
        # compilation happens in the first decode steps: a short run with the same shapes
        # (same max_new_tokens, so the same static cache) pays it, and is timed apart
        from transformers import StoppingCriteriaList

        warm_up = StoppingCriteriaList([_StopAfter(prompt_tokens, 3)])
        compile_started = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, **options, stopping_criteria=warm_up)
        compile_seconds = time.perf_counter() - compile_started
        if seed is not None:
            torch.manual_seed(seed)
    clock = _FirstTokenClock(streamer)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, **options, streamer=clock)
    finished = time.perf_counter()
    new = output[0, kept:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    first = (clock.first_token_at or finished) - started
    return GenerationResult(
        text,
        prompt_tokens,
        int(new.shape[0]),
        finished - started,
        max_new_tokens,
        first,
        compile_seconds,
    )


def check_generates_text(model: nn.Module) -> None:
    """Refuse, in one line, a model that takes no text (images, audio) or writes none."""
    check_takes_text(model, "generate")
    if not getattr(model, "can_generate", lambda: False)():
        raise UsageError(f"{type(model).__name__} does not generate text (not a language model).")


def check_takes_text(model: nn.Module, command: str) -> None:
    """Refuse, in one line, a model whose input is not token ids (images, audio)."""
    reads = getattr(model, "main_input_name", "input_ids")
    if reads != "input_ids":
        kind = {
            "pixel_values": "images",
            "input_values": "audio",
            "input_features": "audio features",
        }.get(reads, reads)
        raise UsageError(
            f"{type(model).__name__} takes {kind}, not a text prompt: {command} works with "
            "text models only."
        )


def compile_options(device: str) -> dict:
    """`generate` options for a static KV cache and a compiled decode step on `device`.

    transformers compiles the decode step by itself only on accelerators; on CPU we ask
    for it, with inductor's default mode (CUDA graphs do not apply there).
    """
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False)
    if device == "cpu":
        config.mode = "default"
        config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def context_length(model: nn.Module) -> int | None:
    """The most tokens the model reads (its position embeddings), when its config says."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
