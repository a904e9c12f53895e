"""Calibration text for GPTQ: read, checked, cut into token samples.

A file is plain UTF-8 text, or JSON Lines whose objects carry a ``text`` field (the usual
form of calibration sets). The default text ships with quantcli (quantcli/data/README.md)
and shares nothing with `quantcli eval`'s default text, so an eval of a GPTQ checkpoint is
not scored on what it was calibrated on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from quantcli.errors import UsageError

DEFAULT_CALIBRATION = "kjv_genesis.txt"
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class CalibrationText:
    name: str
    text: str
    sha256: str  # of the file's bytes (the shipped file's for the default)


@dataclass(frozen=True)
class CalibrationSet:
    """Token samples of one length, ``(samples, seq_len)``, and where they came from."""

    source: CalibrationText
    input_ids: torch.Tensor
    requested_samples: int

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> dict:
        return {
            "name": self.source.name,
            "sha256": self.source.sha256,
            "samples": self.samples,
            "seq_len": self.seq_len,
        }


def default_calibration() -> CalibrationText:
    data = resources.files("quantcli.data").joinpath(DEFAULT_CALIBRATION).read_bytes()
    name = f"{DEFAULT_CALIBRATION} (shipped, public domain)"
    return CalibrationText(name, data.decode("utf-8"), hashlib.sha256(data).hexdigest())


def read_calibration(path: Path | None) -> CalibrationText:
    """The text of a calibration file (None: the shipped default); a file that is missing,
    empty, binary or JSONL without text is refused in one line."""
    if path is None:
        return default_calibration()
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read --calibration {path}: {error.strerror}.") from None
    if b"\0" in data:
        raise UsageError(f"--calibration {path} is a binary file: give plain text or JSONL.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            f"--calibration {path} is not UTF-8 text: give plain text or JSONL."
        ) from None
    if _looks_like_jsonl(path, text):
        text = _jsonl_text(path, text)
    if not text.strip():
        raise UsageError(f"--calibration {path} holds no text.")
    return CalibrationText(Path(path).name, text, hashlib.sha256(data).hexdigest())


def _looks_like_jsonl(path: Path, text: str) -> bool:
    if Path(path).suffix.lower() in (".jsonl", ".ndjson"):
        return True
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _jsonl_text(path: Path, text: str) -> str:
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(
                f"--calibration {path}: line {number} is not JSON (JSONL wants one object "
                "with a 'text' field per line)."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"--calibration {path}: line {number} has no string field 'text'.")
        texts.append(record["text"])
    return "\n\n".join(texts)


def calibration_set(
    source: CalibrationText, tokenizer, samples: int, seq_len: int
) -> CalibrationSet:
    """`samples` windows of `seq_len` tokens, spread evenly over the text without overlap.

    A text too short for all of them gives as many whole windows as it holds (the set
    records how many); one too short for a single window is refused.
    """
    if samples < 1 or seq_len < 2:
        raise UsageError("--samples must be at least 1 and --seq-len at least 2.")
    ids = tokenizer(source.text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    fitting = len(ids) // seq_len
    if fitting == 0:
        raise UsageError(
            f"the calibration text {source.name} has {len(ids)} tokens, fewer than one "
            f"sample of --seq-len {seq_len}: give a longer text or a shorter --seq-len."
        )
    count = min(samples, fitting)
    if count == 1:
        starts = [0]
    else:
        last = len(ids) - seq_len
        starts = [round(k * last / (count - 1)) for k in range(count)]
    return CalibrationSet(
        source=source,
        input_ids=torch.stack([ids[s : s + seq_len] for s in starts]),
        requested_samples=samples,
    )
