"""Files on disk: writing so that readers never see half a file, reading only inside a model.

A model folder is untrusted input: a link or an index entry may point anywhere (a token
file, a FIFO that blocks forever). Every file read for a model goes through
`contained_file` first, which resolves it and refuses what leaves the model's root or is
not a regular file, before anything opens it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantcli.errors import CheckpointError

#: The Hugging Face cache's folder kinds (``models--org--name``): a snapshot's files are
#: links into the repo folder's ``blobs/``, so that folder is the snapshot's root.
_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` (same suffix) to write to: on success it replaces
    `target` in one rename, on failure it is removed."""
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
    )
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def model_root(folder: Path) -> Path:
    """The folder that every file of the model in `folder` must resolve inside: the folder
    itself, or for a Hugging Face cache snapshot its repo folder (which holds ``blobs/``)."""
    folder = folder.resolve()
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith(_CACHE_REPO_PREFIXES):
        return repo
    return folder


def contained_file(path: Path, root: Path) -> Path:
    """`path` resolved, when it is a regular file inside `root`; otherwise a refusal that
    names it. Nothing is opened, so a FIFO or device can neither block nor be read."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise CheckpointError(
            f"{path.name} leads outside the model folder (a link or index entry pointing "
            "elsewhere): refusing to read it; put the file itself in the folder."
        )
    require_regular_file(resolved)
    return resolved


def require_regular_file(path: Path) -> None:
    """Refuse, before opening it, a path that is not a regular file (following links)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        raise CheckpointError(f"{path.name} is missing or unreadable (a broken link?).") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{path.name} is not a regular file (a FIFO, device, socket or folder): "
            "put the file itself in the model folder."
        )


def umask_mode(mode: int = 0o777) -> int:
    """`mode` with the process umask applied: what a plain ``mkdir`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask
