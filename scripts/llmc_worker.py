"""llm-compressor's GPTQModifier on one model; run by bench_gptq.py in llm-compressor's own venv.

llm-compressor pins its own torch, transformers and compressed-tensors, so it lives apart
from quantcli's venv (.cache/llmc-venv) and this script takes plain files instead of
importing quantcli. Usage:

    .cache/llmc-venv/bin/python scripts/llmc_worker.py MODEL CALIBRATION.safetensors OUT \
        --bits 4 --scheme asym --group-size 32 --act-order [--damp 0.01 --block-size 128]

CALIBRATION.safetensors holds one tensor, ``input_ids`` (samples × seq_len), built by
quantcli's own sampler, so both tools calibrate on exactly the same tokens. The settings are
quantcli's: every linear of the blocks quantized (the head kept in float), minmax
scales, damping 0.01 of the Hessian's mean diagonal, lazy batches of 128 columns,
`--act-order` as static groups (llm-compressor's ``actorder="static"``; without the flag
``actorder=None``, where llm-compressor would default to static), float32 weights and
activations during calibration, batches of 8 samples. llm-compressor's sequential pipeline
calibrates a decoder layer's linears together on that layer's float weights (quantcli
calibrates q/k/v, o_proj, gate/up, down_proj one stage after another).

Prints one JSON object on the last line of stdout: "seconds" (load, calibrate and quantize,
save; imports excluded, as quantcli's own figure), the versions used.
"""

from __future__ import annotations

import argparse
import json
import time

BATCH = 8  # samples per calibration forward (quantcli: 4; a sum of products either way)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("calibration")
    parser.add_argument("out")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--scheme", choices=["sym", "asym"], required=True)
    parser.add_argument("--group-size", type=int, help="default: one scale per channel")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="default: torch's (the physical cores)")
    args = parser.parse_args()

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = load_file(args.calibration)["input_ids"]
    batches = [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(BATCH)
    ]
    # a DataLoader is used as given (no tokenizing, shuffling or truncating)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.scheme == "sym",
        strategy="group" if args.group_size else "channel",
        group_size=args.group_size,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        block_size=args.block_size,
        dampening_frac=args.damp,
        actorder="static" if args.act_order else None,
    )
    oneshot(
        model=model,
        tokenizer=args.model,
        dataset=loader,
        recipe=recipe,
        pipeline="sequential",
        num_calibration_samples=len(ids),
    )
    model.save_pretrained(args.out, save_compressed=True)
    transformers.AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    seconds = time.perf_counter() - started
    versions = {
        "llmcompressor": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps({"seconds": round(seconds, 3), "versions": versions}))


if __name__ == "__main__":
    main()
