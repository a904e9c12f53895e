"""Publishing a quantcli checkpoint to the Hub, with a model card written from its files.

Everything goes through `huggingface_hub.HfApi` (so `HF_ENDPOINT`, `HF_TOKEN` and the
token saved by `hf auth login` apply). Tokens are passed along, never printed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from quantcli import __version__
from quantcli.checkpoint import (
    LOCAL_SOURCE_NAME,
    CheckpointSummary,
    read_eval,
    recorded_optimize,
)
from quantcli.config import Scheme
from quantcli.errors import AuthError, CheckpointError, NotFoundError
from quantcli.models.loading import summarize_folder
from quantcli.models.source import CARD_NAME
from quantcli.runtimes import checkpoint_runtimes
from quantcli.units import format_bytes

_CARD_SEAL = re.compile(r"\n<!-- quantcli model card sha256:([0-9a-f]{64}) -->\n?\Z")
_PIPELINES = (  # architecture suffix -> pipeline tag
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
)


@dataclass
class PushResult:
    repo_url: str
    commit_url: str
    commit_oid: str
    changed: bool  # False when the Hub already had these exact files
    card: str  # "written", "refreshed" or "kept (edited by you)"
    pr_url: str | None = None


def push_checkpoint(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    overwrite_card: bool = False,
) -> PushResult:
    """Write the model card into `folder`, then upload the folder to `repo_id`."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    summary = checkpoint_summary(folder)
    token = token or get_token()
    if not token:
        raise AuthError("no Hub token: log in with `hf auth login`, set HF_TOKEN, or pass --token.")
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except HfHubHTTPError as error:
        raise AuthError(
            f"the Hub rejected the token ({_status(error)}): check it or log in again."
        ) from None
    card = write_card(folder, summary, repo_id, overwrite_card)
    try:
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = None if create_pr else api.repo_info(repo_id, revision=revision).sha
        info = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message
            or f"Upload {summary.config.label} checkpoint with quantcli",
            create_pr=create_pr,
            ignore_patterns=[".*", "**/.*", LOCAL_SOURCE_NAME],
        )
    except HfHubHTTPError as error:
        raise AuthError(
            f"the Hub refused the push to {repo_id} as {user} ({_status(error)}): "
            "check the repository name and your write access."
        ) from None
    return PushResult(
        repo_url=repo_url,
        commit_url=info.commit_url,
        commit_oid=info.oid,
        changed=create_pr or info.oid != before,
        card=card,
        pr_url=info.pr_url,
    )


def checkpoint_summary(folder: Path) -> CheckpointSummary:
    """The summary of a folder that must be a quantcli checkpoint, or a clear refusal."""
    if not folder.is_dir():
        raise NotFoundError(f"no folder {folder}: check the path.")
    summary = summarize_folder(folder)
    if summary.kind != "quantcli":
        raise CheckpointError(
            f"{folder} is not a quantcli checkpoint ({summary.kind}): "
            "run `quantcli quantize` on the original model first."
        )
    return summary


def write_card(folder: Path, summary: CheckpointSummary, repo_id: str, overwrite: bool) -> str:
    """Write README.md unless the user edited the one there; say what was done."""
    path = folder / CARD_NAME
    existed = path.is_file()
    if existed and not overwrite and not _is_our_card(path.read_text(encoding="utf-8")):
        return "kept (edited by you; --overwrite-card replaces it)"
    path.write_text(model_card(folder, summary, repo_id), encoding="utf-8")
    return "refreshed" if existed else "written"


def model_card(folder: Path, summary: CheckpointSummary, repo_id: str) -> str:
    from huggingface_hub import ModelCardData

    meta, config = summary.metadata, summary.config
    source = meta.get("source_model", "")
    on_hub = bool(meta.get("source_revision")) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source))
    hf_config = json.loads((folder / "config.json").read_text())
    data = ModelCardData(
        base_model=source if on_hub else None,
        base_model_relation="quantized" if on_hub else None,
        library_name="transformers",
        license=meta.get("source_license") or None,
        pipeline_tag=_pipeline_tag(hf_config.get("architectures") or []),
        tags=["quantized", f"int{config.bits}", "compressed-tensors", "quantcli"],
    )
    source_link = f"[{source}](https://huggingface.co/{source})" if on_hub else f"`{source}`"
    kept = ", ".join(f"`{name}`" for name in config.exclude) or "none"
    source_bytes = int(meta.get("source_bytes") or 0)
    rows = [
        ("bits", str(config.bits)),
        ("scheme", "symmetric" if config.scheme is Scheme.SYM else "asymmetric (zero point)"),
        ("granularity", config.granularity.value),
        ("group size", str(config.group_size or "-")),
        ("linear layers kept in float", kept),
        *_method_rows(meta, folder),
        *([("source weights sha256", meta["source_sha256"])] if "source_sha256" in meta else []),
        ("size before", format_bytes(source_bytes) if source_bytes else "unknown"),
        ("size after", format_bytes(summary.total_bytes)),
        ("effective bits per weight", f"{summary.bits_per_weight:.3f} (quantized layers)"),
    ]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"Weight-only {summary.config.label} quantization of {source_link}, made with "
        f"[quantcli](https://pypi.org/project/quantcli/) {__version__}. The weights are stored "
        "in the compressed-tensors layout.",
        "",
        "## Quantization",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
    ]
    if meta.get("quantcli_command"):
        lines += ["Produced with:", "", "```bash", meta["quantcli_command"], "```", ""]
    lines += _quality_section(folder)
    lines += _usage_section(repo_id, summary)
    body = "\n".join(lines)
    return f"{body}\n<!-- quantcli model card sha256:{_digest(body)} -->\n"


def _method_rows(meta: dict[str, str], folder: Path) -> list[tuple[str, str]]:
    """GPTQ's settings and calibration text, as the weights' header records them, and the
    time it took (recorded beside the weights once done)."""
    clipping = ", clipping search" if recorded_optimize(meta) else ""
    if meta.get("quantization_method") != "gptq" or "gptq" not in meta:
        return (
            [("method", f"round to nearest{clipping}")] if meta.get("quantization_method") else []
        )
    gptq = json.loads(meta["gptq"])
    text = gptq["calibration"]
    return [
        (
            "method",
            f"GPTQ (damp {gptq['damp']}, block size {gptq['block_size']}, "
            f"{'act-order, static groups' if gptq.get('act_order') else 'no act-order'}"
            f"{clipping})",
        ),
        ("calibration", f"{text['samples']} × {text['seq_len']} tokens of {text['name']}"),
        ("calibration sha256", text["sha256"]),
        *_gptq_time(folder),
    ]


def _gptq_time(folder: Path) -> list[tuple[str, str]]:
    from quantcli.models.gptq import GPTQ_RECORD

    try:
        seconds = float(json.loads((folder / GPTQ_RECORD).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [("GPTQ time", f"{seconds:.0f} s")]


def _usage_section(repo_id: str, summary: CheckpointSummary) -> list[str]:
    lines = [
        "## Usage",
        "",
        "With quantcli (its own loader and kernels, the fast path on CPU):",
        "",
        "```bash",
        "pip install quantcli",
        f'quantcli generate {repo_id} "Hello, my name is"',
        "```",
        "",
        "```python",
        "import quantcli",
        f'model = quantcli.load("{repo_id}")',
        "```",
        "",
        "With transformers (`pip install compressed-tensors`):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        "```",
        "",
        "With vLLM:",
        "",
        "```bash",
        f"vllm serve {repo_id}",
        "```",
        "",
        "Where it runs:",
        "",
        "| runtime | runs | why |",
        "|---|---|---|",
    ]
    for verdict in checkpoint_runtimes(summary.config, summary.metadata):
        lines.append(f"| {verdict.runtime} | {'yes' if verdict.runs else 'no'} | {verdict.why} |")
    return lines + [""]


def _quality_section(folder: Path) -> list[str]:
    """The evaluation recorded in the folder by `quantcli eval`, when there is one."""
    results = read_eval(folder)
    if results is None:
        return []
    rows = [f"| {key} | {value} |" for key, value in results.items() if not isinstance(value, dict)]
    return ["## Quality", "", "| metric | value |", "|---|---|", *rows, ""]


def _is_our_card(text: str) -> bool:
    """A card quantcli wrote and nobody changed since: its seal matches its body."""
    match = _CARD_SEAL.search(text)
    return bool(match) and match.group(1) == _digest(text[: match.start()])


def _pipeline_tag(architectures: list[str]) -> str | None:
    for name in architectures:
        for suffix, tag in _PIPELINES:
            if name.endswith(suffix):
                return tag
    return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _status(error: Exception) -> str:
    response = getattr(error, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else type(error).__name__
