"""Text generation with a loaded model: prompt formatting, streaming and timing."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from quantcli.errors import CheckpointError, UsageError, first_line


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    max_new_tokens: int  # after capping to the model's context

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{folder} has no usable tokenizer ({first_line(error)}).") from None


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
) -> GenerationResult:
    """Continue `prompt` (as a chat turn when the tokenizer has a template and `chat` allows)."""
    if not prompt.strip():
        raise UsageError("the prompt is empty: pass some text, or - to read it from stdin.")
    if not getattr(model, "can_generate", lambda: False)():
        raise UsageError(f"{type(model).__name__} does not generate text (not a language model).")
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1.")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError("this tokenizer has no chat template: use --no-chat.")
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    device = next(iter(model.buffers())).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    prompt_tokens = inputs["input_ids"].shape[1]
    context = _context_length(model)
    if context is not None:
        if prompt_tokens >= context:
            raise UsageError(
                f"the prompt has {prompt_tokens} tokens; the model reads at most {context}."
            )
        max_new_tokens = min(max_new_tokens, context - prompt_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    options = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy: no sampling settings, so generation_config defaults do not warn
        options.update(temperature=None, top_p=None, top_k=None)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        options["pad_token_id"] = tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, **options, streamer=streamer)
    seconds = time.perf_counter() - started
    new = output[0, prompt_tokens:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationResult(text, prompt_tokens, int(new.shape[0]), seconds, max_new_tokens)


def _context_length(model: nn.Module) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
