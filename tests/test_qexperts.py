"""`QuantExperts` as a module, against references that are not quantcli's.

Each expert matrix is quantized into the tensors a checkpoint stores for it (`weight_packed`,
`weight_scale`, `weight_shape`, `weight_zero_point`), given to `set_piece` as the loader does,
and the reference is transformers' own float experts module (`MixtralExperts`, its eager
loop) holding compressed-tensors' dequantization of the same tensors (`ct_dequantized`).

Error analysis of the float32 comparisons: both sides compute every weight as
``scale * (q - zero)`` in float32, where ``q - zero`` is an integer below 2**9 and the
product of it with a 24-bit mantissa is exact, so the weights are equal bit for bit. What
may differ is only the summation order of the two matmuls (64-term dot products, values
below ~3): at most a few float32 roundings, ~1e-6 of the largest output. The tolerance,
1e-5 of the largest output, is ten times that, and 1000 times below what a 1% scale error
or a 2x coarser step moves (1e-2 of the outputs or more). Whole-model checks (five families,
every scheme, against transformers loading compressed-tensors' decompression) are in
test_moe.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ct_reference import ct_dequantized
from tiny_models import MOE_CONFIGS
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from quantcli import QuantConfig
from quantcli.errors import CheckpointError
from quantcli.nn.qexperts import QuantExperts, experts_layout_problem
from quantcli.nn.qlinear import compressed_state, quantize_weight

EXPERTS = 4


def float_experts(hidden: int = 64, intermediate: int = 64) -> MixtralExperts:
    """transformers' Mixtral experts (4 of them), random weights of an expert's scale."""
    config = MOE_CONFIGS["mixtral"]()
    config.hidden_size, config.intermediate_size = hidden, intermediate
    experts = MixtralExperts(config).eval()
    generator = torch.Generator().manual_seed(0)
    for parameter in experts.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    return experts


def pieces(experts: MixtralExperts, config: QuantConfig, scale_dtype=torch.float32) -> dict:
    """``(proj, expert, part, parts)``: the checkpoint tensors of each expert matrix (gate and
    up are the two halves of ``gate_up_proj``'s rows); scales in `scale_dtype`, as the
    loader hands them over."""
    out = {}
    intermediate = experts.down_proj.shape[2]
    for e in range(EXPERTS):
        matrices = {
            ("gate_up_proj", e, 0, 2): experts.gate_up_proj.data[e, :intermediate],
            ("gate_up_proj", e, 1, 2): experts.gate_up_proj.data[e, intermediate:],
            ("down_proj", e, 0, 1): experts.down_proj.data[e],
        }
        for key, weight in matrices.items():
            q = quantize_weight(weight, config, scale_dtype)
            out[key] = compressed_state(q.qdata, q.scale, q.zero_point, config)
    return out


def quantized(experts, config, files, dtype=torch.float32) -> QuantExperts:
    """`QuantExperts` in place of `experts`, filled from `files` as the loader does."""
    module = QuantExperts.like(experts, config, dtype)
    for (proj, e, part, parts), state in files.items():
        module.set_piece(proj, e, part, parts, state, f"experts.{proj}[{e}]")
    return module


def reference(experts, config, files) -> MixtralExperts:
    """transformers' float experts holding compressed-tensors' dequantization of `files`."""
    module = copy.deepcopy(experts)
    for (proj, e, part, _), state in files.items():
        shape = state["weight_shape"].tolist()
        named = {f"m.{leaf}": tensor for leaf, tensor in state.items()}
        weight = ct_dequantized(named, "m", config.bits, shape)
        getattr(module, proj).data[e, part * shape[0] : (part + 1) * shape[0]] = weight
    return module


def routing(tokens: int, hidden: int, seed: int = 1):
    """Hidden states, two distinct experts per token and their softmax weights."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(tokens, hidden, generator=generator)
    picks = [torch.randperm(EXPERTS, generator=generator)[:2] for _ in range(tokens)]
    index = torch.stack(picks) if picks else torch.empty(0, 2, dtype=torch.long)
    weights = torch.randn(tokens, 2, generator=generator).softmax(-1)
    return states, index, weights


def close(got, expected) -> bool:
    return torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


SCHEMES = {
    "int8-sym-channel": QuantConfig(bits=8),
    "int8-asym-g32": QuantConfig(bits=8, scheme="asym", group_size=32),
    "int4-asym-g32": QuantConfig(bits=4),
    "int4-sym-tensor": QuantConfig(bits=4, scheme="sym", granularity="tensor"),
    "int2-asym-tensor": QuantConfig(bits=2, granularity="tensor"),
    "int2-asym-channel": QuantConfig(bits=2, granularity="channel"),
}


@pytest.mark.parametrize("tokens", [1, 9], ids=["decode", "prefill"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_is_transformers_float_experts_on_the_dequantized_weights(scheme, tokens):
    """One token (decode: each of its two experts is hit once) and nine (experts hit several
    times, some perhaps never)."""
    config = SCHEMES[scheme]
    experts = float_experts()
    files = pieces(experts, config)
    ours, theirs = quantized(experts, config, files), reference(experts, config, files)
    states, index, weights = routing(tokens, 64)
    with torch.no_grad():
        got, expected = ours(states, index, weights), theirs(states, index, weights)
        unquantized = experts(states, index, weights)
    assert got.shape == (tokens, 64) and got.dtype == torch.float32
    assert close(got, expected), (got - expected).abs().max()
    assert not close(got, unquantized)  # the weights really are the quantized ones


def test_widths_that_are_not_whole_words_are_cut_at_the_matrix_edge():
    """hidden 40 and intermediate 36 at 4 bits (8 values a word): down_proj's rows (36 inputs)
    and the gate and up zero points (36 rows each) end in a partly filled word."""
    config = QuantConfig(bits=4, granularity="channel")
    experts = float_experts(hidden=40, intermediate=36)
    files = pieces(experts, config)
    ours, theirs = quantized(experts, config, files), reference(experts, config, files)
    states, index, weights = routing(6, 40)
    with torch.no_grad():
        assert close(ours(states, index, weights), theirs(states, index, weights))


def test_expert_parallel_sentinel_slots_add_nothing():
    """transformers marks a slot routed to an expert on another rank with index
    ``num_experts``; its own loop skips it, and so must ours."""
    config = QuantConfig(bits=4)
    experts = float_experts()
    files = pieces(experts, config)
    ours, theirs = quantized(experts, config, files), reference(experts, config, files)
    states, index, weights = routing(5, 64)
    index[0, 1] = index[3, 0] = EXPERTS
    with torch.no_grad():
        got, expected = ours(states, index, weights), theirs(states, index, weights)
        # by hand: a sentinel slot contributes as a slot of weight 0
        zeroed = weights.clone()
        zeroed[0, 1] = zeroed[3, 0] = 0
        valid = index.clamp(max=EXPERTS - 1)
        assert close(expected, theirs(states, valid, zeroed))
    assert close(got, expected)


def test_no_tokens_give_an_empty_output():
    """A batch routed nowhere (no tokens): an empty result, as transformers' loop gives."""
    config = QuantConfig(bits=4)
    experts = float_experts()
    files = pieces(experts, config)
    states, index, weights = routing(0, 64)
    with torch.no_grad():
        got = quantized(experts, config, files)(states, index, weights)
        expected = reference(experts, config, files)(states, index, weights)
    assert got.shape == expected.shape == (0, 64)


def test_bfloat16_activations_are_computed_in_float32_on_cpu():
    """On CPU the experts compute in float32 and round once, to bfloat16, at the end.

    Reference: transformers' float experts in float32 on the same bfloat16 inputs and the
    same (bfloat16-scaled) weights, rounded to bfloat16. The float32 results differ by
    ~1e-6 relative (summation order), so the rounded outputs agree but for a value that
    falls within that of a rounding boundary: at most one bfloat16 step (2**-7 of the value,
    relative) apart. Computing in bfloat16 instead rounds the dequantized weights
    (``scale * (q - zero)`` needs 12 bits at 4 bits, bfloat16 has 8) and every
    intermediate: several steps off."""
    config = QuantConfig(bits=4)
    experts = float_experts()
    files = pieces(experts, config, scale_dtype=torch.bfloat16)
    ours = quantized(experts, config, files, dtype=torch.bfloat16)
    theirs = reference(experts, config, files)
    states, index, weights = routing(16, 64)
    states, weights = states.bfloat16(), weights.bfloat16()
    with torch.no_grad():
        got = ours(states, index, weights)
        expected = theirs(states.float(), index, weights.float()).bfloat16()
    assert got.dtype == torch.bfloat16
    step = expected.float().abs() * 2**-7
    assert ((got.float() - expected.float()).abs() <= step).all()


def test_like_is_an_empty_meta_module_in_the_checkpoint_layout():
    """The stacked buffers of the module docstring, with no memory until the first expert
    arrives; sizes from the float module's and its config's, words by hand:
    64 values of 4 bits fill 64 * 4 / 32 = 8 int32 words, groups of 32 give 2 per row."""
    experts = float_experts()
    module = QuantExperts.like(experts, QuantConfig(bits=4), torch.bfloat16)
    config = experts.config
    assert (module.num_experts, module.hidden, module.intermediate) == (
        config.num_local_experts,
        config.hidden_size,
        config.intermediate_size,
    )
    assert module.act_fn is experts.act_fn
    layout = {name: (tuple(b.shape), b.dtype, b.is_meta) for name, b in module.named_buffers()}
    assert layout == {
        "gate_up_proj_packed": ((4, 128, 8), torch.int32, True),
        "gate_up_proj_scale": ((4, 128, 2), torch.bfloat16, True),
        "gate_up_proj_zero_point": ((4, 128, 2), torch.int8, True),
        "down_proj_packed": ((4, 64, 8), torch.int32, True),
        "down_proj_scale": ((4, 64, 2), torch.bfloat16, True),
        "down_proj_zero_point": ((4, 64, 2), torch.int8, True),
    }
    assert module.extra_repr() == (
        "num_experts=4, hidden=64, intermediate=64, bits=4, scheme=asym, "
        "granularity=group, group_size=32"
    )
    channel = QuantExperts.like(experts, QuantConfig(bits=8), torch.float32)
    assert channel.extra_repr() == (
        "num_experts=4, hidden=64, intermediate=64, bits=8, scheme=sym, granularity=channel"
    )
    assert channel.gate_up_proj_scale.shape == (4, 128, 1)
    assert not hasattr(channel, "gate_up_proj_zero_point")


def test_the_first_expert_gives_the_buffers_memory_in_the_files_dtypes():
    """The scales take the dtype the loader gives them (here float16, though `like` said
    float32); integers stay int32 words and int8 zero points."""
    config = QuantConfig(bits=4)
    experts = float_experts()
    files = pieces(experts, config, scale_dtype=torch.float16)
    module = QuantExperts.like(experts, config, torch.float32)
    module.set_piece("down_proj", 2, 0, 1, files[("down_proj", 2, 0, 1)], "down_proj[2]")
    layout = {name: (b.dtype, b.is_meta) for name, b in module.named_buffers()}
    assert layout == {
        "gate_up_proj_packed": (torch.int32, False),
        "gate_up_proj_scale": (torch.float16, False),
        "gate_up_proj_zero_point": (torch.int8, False),
        "down_proj_packed": (torch.int32, False),
        "down_proj_scale": (torch.float16, False),
        "down_proj_zero_point": (torch.int8, False),
    }
    assert module.missing_pieces() == [
        *(f"down_proj[{e}]" for e in (0, 1, 3)),
        *(f"gate_up_proj[{e}]" for e in range(4)),
    ]


# --- set_piece refuses what would compute garbage, naming the tensor ----------------------

NAME = "model.layers.0.mlp.experts.gate_up_proj[1]"


@pytest.fixture
def gate():
    """An empty int4 asym g32 module and expert 1's gate matrix (64 x 64) as stored."""
    config = QuantConfig(bits=4)
    experts = float_experts()
    return QuantExperts.like(experts, config, torch.float32), pieces(experts, config)[
        ("gate_up_proj", 1, 0, 2)
    ]


def refusal(module, state, expert=1, part=0, parts=2) -> str:
    with pytest.raises(CheckpointError) as error:
        module.set_piece("gate_up_proj", expert, part, parts, state, NAME)
    return str(error.value)


@pytest.mark.parametrize(("expert", "part"), [(4, 0), (-1, 0), (1, 2), (1, -1)])
def test_an_expert_or_part_the_module_lacks_is_refused(gate, expert, part):
    module, state = gate
    assert refusal(module, state, expert, part) == f"{NAME}: no expert {expert} in this model."


def test_a_missing_zero_point_is_refused(gate):
    module, state = gate
    del state["weight_zero_point"]
    assert refusal(module, state) == (
        f"{NAME}: expected weight_packed, weight_scale, weight_shape, weight_zero_point for a "
        "4-bit expert, not weight_packed, weight_scale, weight_shape (weight_zero_point)."
    )


def test_a_zero_point_for_a_symmetric_expert_is_refused(gate):
    _, state = gate
    module = QuantExperts.like(float_experts(), QuantConfig(bits=4, scheme="sym"), torch.float32)
    assert refusal(module, state) == (
        f"{NAME}: expected weight_packed, weight_scale, weight_shape for a 4-bit expert, not "
        "weight_packed, weight_scale, weight_shape, weight_zero_point (weight_zero_point)."
    )


def test_a_weight_shape_of_another_matrix_is_refused(gate):
    module, state = gate
    state["weight_shape"] = torch.tensor([32, 64])
    assert refusal(module, state) == f"{NAME}.weight_shape holds [32, 64], not [64, 64]."


@pytest.mark.parametrize(("leaf", "shape"), [("weight_packed", (64, 7)), ("weight_scale", (64, 1))])
def test_packed_words_or_scales_of_another_shape_are_refused(gate, leaf, shape):
    module, state = gate
    state[leaf] = state[leaf][: shape[0], : shape[1]]
    packed, scale = list(state["weight_packed"].shape), list(state["weight_scale"].shape)
    assert refusal(module, state) == (
        f"{NAME}: weight_packed {packed} and weight_scale {scale} do not fit a 64x64 expert "
        "of this config."
    )


@pytest.mark.parametrize("bad", [0.0, -0.5, float("inf"), float("nan")])
def test_a_scale_that_is_not_finite_and_positive_is_refused(gate, bad):
    module, state = gate
    state["weight_scale"][3, 1] = bad
    assert refusal(module, state) == (
        f"{NAME}.weight_scale holds 1 value(s) that are not finite and positive: the "
        "checkpoint is corrupt."
    )
    state["weight_scale"][0] = bad
    assert "holds 3 value(s)" in refusal(module, state)


@pytest.mark.parametrize(("zero", "accepted"), [(-9, False), (-8, True), (7, True), (8, False)])
def test_a_per_tensor_zero_point_outside_the_bit_range_is_refused(zero, accepted):
    """Per tensor, the zero point is stored as a plain int8 (packed ones cannot leave the
    range): at 4 bits it must lie in -8..7."""
    config = QuantConfig(bits=4, granularity="tensor")
    experts = float_experts()
    module = QuantExperts.like(experts, config, torch.float32)
    state = pieces(experts, config)[("gate_up_proj", 1, 0, 2)]
    state["weight_zero_point"] = torch.tensor([zero], dtype=torch.int8)
    if accepted:
        module.set_piece("gate_up_proj", 1, 0, 2, state, NAME)
        assert (module.gate_up_proj_zero_point[1, :64] == zero).all()
    else:
        assert refusal(module, state) == f"{NAME}.weight_zero_point holds values outside -8..7."


# --- experts_layout_problem: which experts modules QuantExperts can stand in for ----------


class PlainExperts(nn.Module):
    """Experts written without transformers' decorator: no layout flags, no _apply_gate."""

    def __init__(self, experts=4, double=12, hidden=8, down=None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(experts, double, hidden))
        self.down_proj = nn.Parameter(torch.zeros(down or (experts, hidden, double // 2)))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise NotImplementedError


class OwnGate(PlainExperts):
    def _apply_gate(self, gate_up_out):
        raise NotImplementedError


class OtherCall(PlainExperts):
    def forward(self, hidden_states, router_indices, routing_weights):
        raise NotImplementedError


def flagged(**flags) -> PlainExperts:
    module = PlainExperts()
    for name, value in flags.items():
        if name == "act_fn":
            del module.act_fn  # a child module: a plain function cannot take its place
        setattr(module, name, value)
    return module


def test_transformers_experts_and_plain_ones_are_accepted():
    assert experts_layout_problem(float_experts()) is None
    assert experts_layout_problem(PlainExperts()) is None
    # the flags transformers' decorator sets, at the values QuantExperts computes
    assert experts_layout_problem(flagged(is_transposed=False, has_bias=False)) is None
    assert experts_layout_problem(flagged(is_concatenated=True, has_gate=True)) is None
    assert experts_layout_problem(flagged(has_post_expert_norm=False)) is None


def with_bias() -> PlainExperts:
    module = PlainExperts()
    module.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 12))
    return module


@pytest.mark.parametrize(
    ("module", "problem"),
    [
        (with_bias, "parameters ['down_proj', 'gate_up_proj', 'gate_up_proj_bias'], not "
         "gate_up_proj and down_proj"),
        (lambda: PlainExperts(down=(8, 6)),
         "gate_up_proj [4, 12, 8] and down_proj [8, 6] are not 3-D"),
        (lambda: PlainExperts(double=7, down=(4, 8, 3)),
         "gate_up_proj [4, 7, 8] and down_proj [4, 8, 3] do not fit together"),
        (lambda: PlainExperts(down=(4, 8, 5)),
         "gate_up_proj [4, 12, 8] and down_proj [4, 8, 5] do not fit together"),
        (lambda: flagged(is_transposed=True), "transposed or biased expert weights"),
        (lambda: flagged(has_bias=True), "transposed or biased expert weights"),
        (lambda: flagged(has_post_expert_norm=True),
         "a norm after each expert (post_expert_norm)"),
        (lambda: flagged(is_concatenated=False), "gate and up rows interleaved"),
        (lambda: flagged(has_gate=False), "no gated activation"),
        (lambda: flagged(act_fn=nn.functional.silu), "no gated activation"),
        (OwnGate, "its own gating (OwnGate._apply_gate)"),
        (OtherCall, "a forward taking (hidden_states, router_indices, routing_weights)"),
    ],
)  # fmt: skip
def test_a_layout_quantexperts_cannot_compute_is_named(module, problem):
    assert experts_layout_problem(module()) == problem
