"""Tiny random transformers models built from configs: offline stand-ins for Hub models.

Sizes are multiples of 32 so every default group size divides them.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    T5Config,
)

VOCAB = 128

CONFIGS = {
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "bert": lambda: BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    ),
    "t5": lambda: T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_ff=128,
        d_kv=32,
        num_layers=2,
        num_heads=2,
    ),
}

AUTO_CLASS = {
    "opt": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
    "gpt2": AutoModelForCausalLM,
    "bert": AutoModelForMaskedLM,
    "t5": AutoModelForSeq2SeqLM,
}


def _moe_common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _moe_configs() -> dict:
    """Tiny mixtures of experts: 2 layers, 4 experts, top-2, widths multiples of 32.

    Kept apart from CONFIGS: the experts are fused 3-D parameters, not linear layers, so the
    dense models' tests (replace_linear_layers in memory) do not apply to them.
    """
    from transformers import (
        DeepseekV3Config,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    return {
        "mixtral": lambda: MixtralConfig(
            **_moe_common(), intermediate_size=64, num_local_experts=4
        ),
        "qwen2_moe": lambda: Qwen2MoeConfig(
            **_moe_common(),
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_experts=4,
        ),
        "qwen3_moe": lambda: Qwen3MoeConfig(
            **_moe_common(),
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=4,
            head_dim=16,
        ),
        "olmoe": lambda: OlmoeConfig(**_moe_common(), intermediate_size=64, num_experts=4),
        # shared experts, grouped routing (2 groups, 1 picked), a dense first layer, MLA
        "deepseek_v3": lambda: DeepseekV3Config(
            **_moe_common(),
            intermediate_size=128,
            moe_intermediate_size=64,
            n_routed_experts=4,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
        ),
    }


MOE_CONFIGS = _moe_configs()


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random model of `arch` (dense or MoE) in eval mode, reproducible from `seed`."""
    torch.manual_seed(seed)
    if arch in MOE_CONFIGS:
        return AutoModelForCausalLM.from_config(MOE_CONFIGS[arch]()).eval()
    return AUTO_CLASS[arch].from_config(CONFIGS[arch]()).eval()


def sample_inputs(arch: str, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    inputs = {"input_ids": ids}
    if arch == "t5":
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs(arch)).logits


def char_tokenizer():
    """A character-level tokenizer that fits VOCAB, with a chat template: no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(code) for code in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    return tokenizer
