"""The checkpoint format: the one module that knows how quantcli's files look on disk.

A quantcli checkpoint is a Hugging Face model folder in the compressed-tensors layout:

- ``config.json`` with ``quantization_config`` (``quant_method: compressed-tensors``,
  ``format`` both at the top and inside the config group: compressed-tensors 0.20 guesses
  wrong without the inner one);
- ``model.safetensors`` or shards plus ``model.safetensors.index.json``, holding each layer's
  `QuantLinear` state_dict (``weight``/``weight_packed``, ``weight_scale``...);
- in every shard's header metadata: quantcli's version, the format version, the full
  quantization config and the source model.

Tensors are read and written with plain file I/O rather than memory maps: a shard's header
is written first (every output shape is known in advance), then tensors one at a time, so
memory holds one tensor, not a shard, and mapped pages never inflate the process.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from quantcli.config import Granularity, QuantConfig, Scheme
from quantcli.errors import CheckpointError, first_line
from quantcli.files import contained_file, model_root, require_regular_file
from quantcli.tensor.packing import require_little_endian

# 2: 8-bit weights packed into int32 words (pack-quantized), as compressed-tensors writes them
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
COMPRESSED_TENSORS_VERSION = "0.20.0"
EVAL_NAME = "quantcli_eval.json"  # quality figures recorded by `quantcli eval`
#: Where a local source lies, for `eval` to find its baseline; never uploaded by `push`.
LOCAL_SOURCE_NAME = "quantcli_local_source.json"

_DTYPES = {  # every safetensors dtype torch can hold; F4 and F6_* are refused by name
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file, read from the header alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape, known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, without reading tensor data.

    The `safetensors` library parses and validates the header first (offsets that overlap
    or leave gaps, unknown dtypes, oversized or malformed headers are its refusals); only
    then are the offsets read here, for the streaming reader.
    """
    from safetensors import SafetensorError, safe_open

    require_regular_file(path)
    try:
        with safe_open(path, framework="pt") as checked:
            metadata = checked.metadata() or {}
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size), object_pairs_hook=_refuse_duplicates(path))
    except SafetensorError as error:
        reason = first_line(error).removeprefix("Error while deserializing header: ")
        raise CheckpointError(
            f"{path.name} is truncated or corrupt ({reason}): download or write it again."
        ) from None
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    tensors = {}
    for name, entry in header.items():
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{path.name}: tensor '{name}' has dtype {entry['dtype']}, which quantcli "
                "cannot read (sub-byte floats are not supported)."
            )
        start, end = entry["data_offsets"]
        tensors[name] = TensorInfo(
            name, dtype, tuple(entry["shape"]), path, data_start + start, end - start
        )
    return tensors, metadata


def _refuse_duplicates(path: Path):
    """A JSON object hook that refuses a name given twice (JSON keeps the last silently)."""

    def build(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result = dict(pairs)
        if len(result) != len(pairs):
            duplicate = next(key for key in result if sum(k == key for k, _ in pairs) > 1)
            raise CheckpointError(f"{path.name}: the header names '{duplicate}' twice.")
        return result

    return build


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into fresh memory (no memory map)."""
    buffer = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        if f.readinto(buffer) != info.nbytes:
            raise CheckpointError(f"{info.file.name}: tensor '{info.name}' is truncated.")
    if not info.nbytes:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, from its index when it is sharded.

    Every file must be a regular file inside the model's root (`contained_file`); an index
    must name each tensor in the shard that holds it.
    """
    root = model_root(folder)
    index = folder / INDEX_NAME
    if index.exists() or index.is_symlink():
        return _indexed_files(folder, contained_file(index, root), root)
    if (folder / WEIGHTS_NAME).exists() or (folder / WEIGHTS_NAME).is_symlink():
        contained_file(folder / WEIGHTS_NAME, root)
        return [folder / WEIGHTS_NAME]
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        for path in singles:
            contained_file(path, root)
        return singles
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt")
    )
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({pickles[0]}), which can run code when "
            "loaded: convert the model to safetensors, or pass --allow-pickle to read them "
            "with torch.load(weights_only=True)."
        )
    raise CheckpointError(f"{folder} holds no safetensors weights.")


def _indexed_files(folder: Path, index: Path, root: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{INDEX_NAME} is not a valid safetensors index.") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{INDEX_NAME}: 'weight_map' must map tensor names to files.")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(
                f"{INDEX_NAME}: the file of tensor '{name}' must be a file name, not {file!r}."
            )
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(
                f"{INDEX_NAME}: tensor '{name}' points outside the model folder ({file}): "
                "refusing to read it."
            )
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.exists() and not f.is_symlink()]
    if missing:
        raise CheckpointError(
            f"{folder} lacks the shard(s) {', '.join(missing)} named in its index."
        )
    held = {}
    for path in files:
        contained_file(path, root)
        held[path] = read_header(path)[0]
    for name, file in weight_map.items():
        if name not in held[folder / file]:
            raise CheckpointError(
                f"{INDEX_NAME} puts tensor '{name}' in {file}, which does not hold it."
            )
    return files


def read_all_headers(files: Iterable[Path]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor of a checkpoint, and the first shard's metadata; a tensor in two files
    is refused (which copy would win is arbitrary)."""
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] | None = None
    for path in files:
        infos, meta = read_header(path)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor '{name}' is in both {tensors[name].file.name} and {path.name}: "
                    "keep one copy."
                )
            tensors[name] = info
        metadata = meta if metadata is None else metadata
    return tensors, metadata or {}


class ShardWriter:
    """Writes one safetensors file whose tensors are all declared up front.

    The header goes out first; `write` then appends each tensor's bytes in the declared
    order, so only one tensor is ever in memory. Use it as a context manager.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": _DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._pending = list(specs)
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._pending.pop(0)
        actual = (name, tensor.dtype, tuple(tensor.shape))
        if actual != (expected.name, expected.dtype, expected.shape):
            raise RuntimeError(f"shard writer expected {expected}, got {actual}")
        if tensor.numel():
            require_little_endian()
            self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._file.close()
        if exc_type is None and self._pending:
            raise RuntimeError(f"shard closed with {len(self._pending)} tensors unwritten")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def shard_name(index: int, count: int) -> str:
    return WEIGHTS_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def quantization_config(config: QuantConfig, ignore: list[str], heads: list[str] = ()) -> dict:
    """``config.json``'s ``quantization_config`` in the compressed-tensors form.

    Weight-only int of every width is ``pack-quantized``: ``int-quantized`` means W8A8 to
    compressed-tensors' own writer (``infer_module_format``) and to vLLM, which refuses it
    without activation settings. `heads` (quantized output heads) are targets by name:
    vLLM's head is a ``ParallelLMHead``, which the class name ``Linear`` does not match.
    """
    fmt = "pack-quantized"
    # vLLM and compressed-tensors match a class name: nn.Embedding, VocabParallelEmbedding
    targets = ["Linear", *(["Embedding"] if config.quantize_embeddings else []), *heads]
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "ignore": sorted(ignore),
        "config_groups": {
            "group_0": {
                "targets": targets,
                "format": fmt,
                "weights": {
                    "num_bits": config.bits,
                    "type": "int",
                    "symmetric": config.symmetric,
                    "strategy": config.granularity.value,
                    "group_size": config.group_size,
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": COMPRESSED_TENSORS_VERSION,
    }


def parse_quantization_config(raw: object) -> tuple[QuantConfig, str]:
    """The `QuantConfig` and the weight format of a compressed-tensors config.

    Accepts what quantcli writes and the same int-weight layouts from other tools
    (llm-compressor's W8A16, W4A16, W4A16_ASYM; ``int-quantized`` 8-bit from older quantcli;
    ``ignore`` and ``targets`` as names, ``re:`` regexes or the class ``Linear``); refuses
    anything else with the reason.
    """
    if not isinstance(raw, dict) or raw.get("quant_method") != "compressed-tensors":
        method = raw.get("quant_method") if isinstance(raw, dict) else None
        raise CheckpointError(
            f"this checkpoint is quantized with '{method}', not compressed-tensors: "
            "quantcli loads only compressed-tensors int checkpoints."
        )
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise CheckpointError(
            "quantcli loads compressed-tensors checkpoints with one config group."
        )
    group = next(iter(groups.values()))
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError("the quantization config has no 'weights' settings.")
    if group.get("input_activations") or weights.get("type", "int") != "int":
        raise CheckpointError(
            "quantcli loads int weight-only checkpoints (no activation quantization)."
        )
    fmt = group.get("format") or raw.get("format")
    bits = weights.get("num_bits")
    for field in ("num_bits", "group_size"):  # 8.0 == 8 and True == 1: only true integers
        value = weights.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise CheckpointError(
                f"the quantization config's '{field}' must be an integer, not {value!r}."
            )
    readable = ("pack-quantized", "int-quantized") if bits == 8 else ("pack-quantized",)
    if fmt not in readable:
        raise CheckpointError(
            f"format '{fmt}' with {bits}-bit weights is not a layout quantcli reads "
            f"(it reads {' or '.join(readable)})."
        )
    exclude = _names_or_patterns(raw.get("ignore") or [], "ignore")
    targets = _names_or_patterns(group.get("targets") or ["Linear"], "targets")
    if "Linear" not in targets:  # only these modules are quantized: exclude every other
        exclude.append("re:(?!" + "|".join(_as_regex(target) for target in targets) + ")")
    try:
        config = QuantConfig(
            bits=bits,
            scheme=Scheme.SYM if weights.get("symmetric", True) else Scheme.ASYM,
            granularity=Granularity(weights.get("strategy")),
            group_size=weights.get("group_size") if weights.get("strategy") == "group" else None,
            exclude=tuple(exclude),
            quantize_head=True,  # the head, when kept in float, is in `ignore`
            quantize_embeddings="Embedding" in targets,
        )
    except ValueError as error:
        raise CheckpointError(f"unsupported quantization config: {error}") from None
    return config, fmt


def _names_or_patterns(entries: object, field: str) -> list[str]:
    """compressed-tensors' ``ignore``/``targets``: module names, ``re:`` regexes, ``Linear``."""
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise CheckpointError(f"the quantization config's '{field}' must be a list of names.")
    for entry in entries:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as error:
                raise CheckpointError(
                    f"the quantization config's '{field}' holds a bad regex {entry!r}: {error}."
                ) from None
    return list(entries)


def _as_regex(target: str) -> str:
    """A ``targets`` entry as a regex matched from the start of a module name."""
    return f"(?:{target[3:]})" if target.startswith("re:") else re.escape(target) + "$"


def header_metadata(config: QuantConfig, source: str, revision: str | None) -> dict[str, str]:
    from quantcli import __version__

    return {
        "format": "pt",
        "quantcli_version": __version__,
        "quantcli_format_version": str(FORMAT_VERSION),
        "quantization_config": json.dumps(quantization_config(config, [])["config_groups"]),
        "quantcli_config": json.dumps(
            {
                "bits": config.bits,
                "scheme": config.scheme.value,
                "granularity": config.granularity.value,
                "group_size": config.group_size,
                "exclude": list(config.exclude),
                "quantize_head": config.quantize_head,
                "quantize_embeddings": config.quantize_embeddings,
                "dtype": str(config.dtype).removeprefix("torch.") if config.dtype else None,
                "optimize": config.optimize,
            }
        ),
        "source_model": source,
        "source_revision": revision or "",
    }


def check_format_version(metadata: dict[str, str], where: str) -> None:
    """Refuse files written by a newer quantcli whose format this one may misread."""
    version = metadata.get("quantcli_format_version")
    if version is None:
        return  # a compressed-tensors file from another tool
    if not (version.isascii() and version.isdecimal()) or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} uses quantcli format version {version}; this quantcli reads up to "
            f"{FORMAT_VERSION}: upgrade quantcli."
        )


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class LayerSummary:
    """One module of a checkpoint as its headers describe it."""

    name: str
    kind: str  # "int8", "int4", "int2" or "float"
    shape: tuple[int, ...]  # (out, in) of the weight
    nbytes: int
    params: int


@dataclass
class CheckpointSummary:
    """What `inspect` reports, read from config.json and safetensors headers only."""

    kind: str  # "quantcli", "compressed-tensors", "float" or "other:<method>"
    config: QuantConfig | None
    layers: list[LayerSummary]
    other_bytes: int  # tensors outside the layers listed (norms, position ids...)
    total_bytes: int
    files: int
    metadata: dict[str, str]

    @property
    def quantized(self) -> list[LayerSummary]:
        return [layer for layer in self.layers if layer.kind != "float"]

    @property
    def bits_per_weight(self) -> float:
        layers = self.quantized
        params = sum(layer.params for layer in layers)
        return 8 * sum(layer.nbytes for layer in layers) / params if params else 0.0


def summarize(folder: Path, raw_quantization_config: object) -> CheckpointSummary:
    """Describe a model folder from its headers: no tensor data is read."""
    files = weight_files(folder)
    tensors, metadata = read_all_headers(files)
    config = None
    if raw_quantization_config is None:
        kind = "float"
    elif isinstance(raw_quantization_config, dict) and (
        raw_quantization_config.get("quant_method") == "compressed-tensors"
    ):
        check_format_version(metadata, str(folder))
        config, _ = parse_quantization_config(raw_quantization_config)
        kind = "quantcli" if "quantcli_version" in metadata else "compressed-tensors"
        if recorded_optimize(metadata):
            config = replace(config, optimize=True)
    else:
        method = getattr(raw_quantization_config, "get", lambda _: None)("quant_method")
        kind = f"other:{method}"

    by_module: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, {})[leaf] = info
    layers = []
    for module, parts in sorted(by_module.items(), key=lambda item: _model_order(item[0])):
        layer = _layer_summary(module, parts, config)
        if layer is not None:
            layers.append(layer)
    listed = sum(layer.nbytes for layer in layers)
    total = sum(info.nbytes for info in tensors.values())
    return CheckpointSummary(kind, config, layers, total - listed, total, len(files), metadata)


def _model_order(name: str) -> list[tuple[int, int | str]]:
    """A sort key that puts ``layers.2`` before ``layers.10``, as the model numbers them
    (safetensors headers list names alphabetically)."""
    return [
        (0, int(part)) if part.isascii() and part.isdecimal() else (1, part)
        for part in name.split(".")
    ]


def recorded_optimize(metadata: dict[str, str]) -> bool:
    """Whether quantcli's metadata says the clipping search made these integers (the
    compressed-tensors config cannot say it: the layout is the same)."""
    try:
        recorded = json.loads(metadata.get("quantcli_config", "{}"))
    except ValueError:
        return False
    return isinstance(recorded, dict) and recorded.get("optimize") is True


def _layer_summary(
    module: str, parts: dict[str, TensorInfo], config: QuantConfig | None
) -> LayerSummary | None:
    nbytes = sum(info.nbytes for info in parts.values())
    if "weight_scale" in parts and config is not None:
        integers = parts.get("weight_packed") or parts.get("weight")
        grouped = config.granularity is Granularity.GROUP
        if (
            integers is None
            or len(integers.shape) != 2
            or (grouped and len(parts["weight_scale"].shape) != 2)
        ):
            raise CheckpointError(
                f"{module}.weight_scale has no 2-D weight_packed or weight beside it, or the "
                "wrong shape: the checkpoint is incomplete or corrupt."
            )
        if "weight_packed" in parts:
            out_features = parts["weight_packed"].shape[0]
            in_features = _packed_in_features(parts, config)
        else:
            out_features, in_features = parts["weight"].shape
        params = out_features * in_features
        return LayerSummary(
            module, f"int{config.bits}", (out_features, in_features), nbytes, params
        )
    weight = parts.get("weight")
    if weight is not None and len(weight.shape) == 2:
        return LayerSummary(module, "float", weight.shape, nbytes, weight.numel)
    return None


def _packed_in_features(parts: dict[str, TensorInfo], config: QuantConfig) -> int:
    """in_features of a packed layer, from shapes alone (``weight_shape``'s value is data)."""
    if config.granularity is Granularity.GROUP:
        return parts["weight_scale"].shape[1] * config.group_size
    return parts["weight_packed"].shape[1] * 32 // config.bits  # exact for in % (32/bits) == 0


def write_local_source(folder: Path, source: Path) -> None:
    (folder / LOCAL_SOURCE_NAME).write_text(json.dumps({"path": str(source)}) + "\n")


def read_local_source(folder: Path) -> str | None:
    """The local source's absolute path recorded by `write_local_source`, or None."""
    try:
        recorded = json.loads((folder / LOCAL_SOURCE_NAME).read_text())
    except (OSError, ValueError):
        return None
    path = recorded.get("path") if isinstance(recorded, dict) else None
    return path if isinstance(path, str) else None


def read_eval(folder: Path) -> dict | None:
    """The figures `quantcli eval` recorded in the folder, or None (also when unreadable)."""
    path = folder / EVAL_NAME
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None
