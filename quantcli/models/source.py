"""Where a model comes from: a local folder, or a Hub repository through the HF cache.

Hub files come through `huggingface_hub.snapshot_download`, so the user's cache, token and
`HF_ENDPOINT` apply; only the files quantcli reads are downloaded, never pickles.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from quantcli.errors import CheckpointError, NotFoundError, UsageError, first_line
from quantcli.files import contained_file, model_root

#: Files besides the weights that travel with a model: configs, tokenizer, chat template.
SIDE_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "LICENSE*",
)
#: The source's model card: read for its license, never copied (it describes the float model).
CARD_NAME = "README.md"
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
#: Pickle weights, fetched only with --allow-pickle.
PICKLE_PATTERNS = ("*.bin", "*.pt", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelSource:
    """A model folder on disk and where it came from."""

    folder: Path
    model_id: str  # as the user named it: Hub id or path
    revision: str | None  # the Hub commit, None for a local folder

    @property
    def local_folder(self) -> Path | None:
        """The folder the user named, resolved (not `folder`, which may be a temporary
        conversion); None for a Hub source."""
        return None if self.revision else Path(self.model_id).expanduser().resolve()

    @property
    def public_name(self) -> str:
        """How published files name the source: the Hub id, or a local folder's name only
        (an absolute path would tell the world who made it, and where)."""
        return self.model_id if self.local_folder is None else self.local_folder.name


def resolve_model(
    model: str, revision: str | None = None, token: str | None = None, allow_pickle: bool = False
) -> ModelSource:
    """Find `model` locally, or download its safetensors and side files from the Hub
    (and its pickle weights when `allow_pickle`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise UsageError(
                f"--revision {revision} applies to Hub ids, not to the local folder {model}."
            )
        check_model_files(path.resolve())
        return ModelSource(path.resolve(), model, None)
    if path.exists():
        raise NotFoundError(
            f"{model} is a file, not a model folder: pass the folder that holds it."
        )
    if _looks_like_a_path(model):
        raise NotFoundError(f"no folder {model}: check the path.")
    return _download(model, revision, token, allow_pickle)


def expand_model_folders(models: list[str]) -> list[str]:
    """Each name as given, except a local folder holding no model but model folders (say
    ./out/ with int8/ and int4/ inside): those, in name order. Lets one call take every
    scheme quantized into a folder."""
    expanded = []
    for model in models:
        inner = _model_subfolders(Path(model).expanduser())
        if inner:
            expanded.extend(str(folder) for folder in inner)
        else:
            expanded.append(model)
    return expanded


def _model_subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir() or (folder / "config.json").exists():
        return []
    try:
        return sorted(child for child in folder.iterdir() if (child / "config.json").is_file())
    except OSError:
        return []  # resolve_model then names the problem


def side_files(folder: Path) -> list[Path]:
    """The non-weight files of a model folder to copy next to a quantized checkpoint."""
    return _known_files(folder, SIDE_FILE_PATTERNS)


def check_model_files(folder: Path) -> None:
    """Refuse a model folder in which a file quantcli or transformers would read (config,
    tokenizer, weights, card) leads outside the model's root or is not a regular file."""
    _known_files(folder, (*SIDE_FILE_PATTERNS, *WEIGHT_PATTERNS, *PICKLE_PATTERNS, CARD_NAME))


def _known_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The entries of `folder` matching `patterns`, each checked by `contained_file` (real
    subfolders, which nothing reads as a file, are skipped)."""
    root = model_root(folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if not any(fnmatchcase(entry.name, pattern) for pattern in patterns):
            continue
        if entry.is_dir() and not entry.is_symlink():
            continue
        contained_file(entry, root)
        found.append(entry)
    return found


def check_tokenizer_file(folder: Path) -> None:
    """Refuse a tokenizer.json that the `tokenizers` library cannot parse, by name."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return
    try:
        Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - its parser's refusals have no common type
        raise CheckpointError(
            f"{path.name} in {folder} is not a tokenizer ({first_line(error)}): copy the "
            "original model's tokenizer files into the folder."
        ) from None


def card_license(folder: Path) -> str | None:
    """The `license` of a model card's YAML front matter, when the folder has a card."""
    card = folder / CARD_NAME
    if not card.exists() and not card.is_symlink():
        return None
    contained_file(card, model_root(folder))
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a malformed card must not stop a quantization
        return None


def _looks_like_a_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or os.sep != "/"
        and os.sep in model
    )


def _download(
    repo_id: str, revision: str | None, token: str | None, allow_pickle: bool
) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            allow_patterns=[
                *SIDE_FILE_PATTERNS,
                *WEIGHT_PATTERNS,
                CARD_NAME,
                *(PICKLE_PATTERNS if allow_pickle else ()),
            ],
        )
    except GatedRepoError:
        raise NotFoundError(
            f"{repo_id} is gated: accept its terms on the Hub, then log in (hf auth login)."
        ) from None
    except RepositoryNotFoundError:
        raise NotFoundError(
            f"{repo_id} is neither a local folder nor a Hub repository you can access: check "
            "the name, or log in (hf auth login) for a private one."
        ) from None
    except RevisionNotFoundError:
        raise NotFoundError(f"{repo_id} has no revision '{revision}'.") from None
    except LocalEntryNotFoundError:
        raise NotFoundError(
            f"cannot reach the Hub to download {repo_id}, and it is not in the local cache: "
            "check your connection (or HF_HUB_OFFLINE)."
        ) from None
    except HfHubHTTPError as error:
        raise NotFoundError(f"the Hub refused to send {repo_id}: {first_line(error)}") from None
    folder = Path(folder)
    check_model_files(folder)
    return ModelSource(folder, repo_id, folder.name)


def safetensors_copy(source: ModelSource, into: Path) -> ModelSource:
    """`source` with its pickle weights converted to safetensors in the folder `into`.

    Only for --allow-pickle: `torch.load(weights_only=True)` refuses anything but tensors
    and plain containers, so no code in the files runs. Tensors that share memory (tied
    weights) are written once, as transformers saves them.
    """
    import torch
    from safetensors.torch import save_file

    pickles = _known_files(source.folder, ("*.bin", "*.pt"))
    if not pickles:
        return source
    for path in pickles:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure is the file's
            raise CheckpointError(
                f"{path.name} is not a plain tensor checkpoint ({first_line(error)})."
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(t, torch.Tensor) for t in state.values()
        ):
            raise CheckpointError(f"{path.name} does not hold a state dict of tensors.")
        seen, tensors = set(), {}
        for name, tensor in state.items():
            if tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                tensors[name] = tensor.contiguous()
        save_file(tensors, into / f"{path.stem}.safetensors", metadata={"format": "pt"})
    for path in _known_files(source.folder, (*SIDE_FILE_PATTERNS, CARD_NAME)):
        shutil.copyfile(path, into / path.name)
    return ModelSource(into, source.model_id, source.revision)
