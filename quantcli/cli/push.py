"""`quantcli push`: upload a checkpoint to the Hub with a generated model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from quantcli.cli.options import (
    JsonOption,
    TokenOption,
)
from quantcli.cli.output import (
    stderr,
    stdout,
)
from quantcli.errors import UsageError
from quantcli.hub import push_checkpoint

# Shown under --help.
EXAMPLES = [
    "quantcli push ./opt-125m-int8 me/opt-125m-int8",
    "quantcli push ./llama-int4 me/llama-int4 --private --revision v2",
]


def push(
    folder: Annotated[Path, typer.Argument(help="Quantized checkpoint folder (from quantize).")],
    repo_id: Annotated[
        str, typer.Argument(help="Hub repository, USER/NAME (created if needed).", metavar="REPO")
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private.")
    ] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to push to (created if missing).", metavar="BRANCH")
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option(help="Commit message.", metavar="TEXT")
    ] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")
    ] = False,
    overwrite_card: Annotated[
        bool, typer.Option("--overwrite-card", help="Regenerate README.md even if you edited it.")
    ] = False,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Upload a quantized checkpoint to the Hub, with a model card written from its files.

    The card (README.md in the folder) lists the settings, sizes, the command that made the
    checkpoint and how to use it. A card you edited is kept unless --overwrite-card.
    Pushing unchanged files makes no new commit.
    """
    if create_pr and revision:
        raise UsageError("--create-pr opens a pull request against main: drop --revision.")
    result = push_checkpoint(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        overwrite_card=overwrite_card,
    )
    if json_output:
        print(json.dumps(result.__dict__))
        return
    stderr.print(f"Model card: {result.card}.")
    if not result.changed:
        stdout.print(
            f"No changes: {result.repo_url} already has these files "
            f"(commit {result.commit_oid[:10]}); nothing was committed."
        )
    elif result.pr_url:
        stdout.print(f"Opened {result.pr_url} (commit {result.commit_oid[:10]}).")
    else:
        stdout.print(f"Pushed to {result.repo_url} (commit {result.commit_url}).")
