"""The commands the README and the getting-started page show run as written.

Every `quantcli ...` line of a ```bash block and every `$ quantcli ...` line of a
```console block is run, in the page's order, in a temporary folder that holds tiny local
models under the names the commands use (a local folder shadows a Hub id of the same
name); `push` goes to the local Hub double, as user `me`, and `generate me/...` reads back
from it.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import hub_env
from hub_double import HubDouble
from tiny_models import CONFIGS, char_tokenizer
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-docs-51f2"
# the models each page starts from: folder name -> tiny architecture ("llama-512": the
# tiny Llama with room for the getting-started page's 74-character chat prompt)
MODELS = {
    "README.md": {"facebook/opt-125m": "opt", "my-llama": "llama"},
    "docs/index.md": {"SmolLM2-135M-Instruct": "llama-512"},
}
# commands that cannot run offline even with the doubles: (page, command) -> why
SKIPPED: dict[tuple[str, str], str] = {}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def documented_commands(page: str) -> list[str]:
    """The quantcli command lines of a page's bash and console blocks, in order."""
    commands = []
    for language, body in FENCE.findall((ROOT / page).read_text("utf-8")):
        for line in body.splitlines():
            if language == "bash" and line.startswith("quantcli "):
                commands.append(line)
            elif language == "console" and line.startswith("$ quantcli "):
                commands.append(line.removeprefix("$ "))
    return commands


def test_the_pages_show_commands():
    """The extraction finds what the pages show (a guard against a silent empty run)."""
    assert len(documented_commands("README.md")) >= 9
    assert len(documented_commands("docs/index.md")) >= 8


@pytest.mark.parametrize("page", list(MODELS))
def test_documented_commands_run_as_written(page, saved_models, tmp_path):
    for name, arch in MODELS[page].items():
        if arch == "llama-512":
            config = CONFIGS["llama"]()
            config.max_position_embeddings = 512
            AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
            char_tokenizer().save_pretrained(tmp_path / name)
        else:
            shutil.copytree(saved_models(arch), tmp_path / name)
    with HubDouble({TOKEN: "me"}) as hub:
        env = hub_env(hub.url, tmp_path / ".hf-home", TOKEN)
        for command in documented_commands(page):
            if (page, command) in SKIPPED:
                continue
            result = subprocess.run(
                ["bash", "-c", command.replace("quantcli", f"{sys.executable} -m quantcli", 1)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, (page, command, result.stderr)
