"""push and generate end to end against the local Hub double (tests/hub_double.py).

quantcli runs as a subprocess with HF_ENDPOINT pointing at the double, a fresh HF_HOME,
and xet disabled: the product only ever talks to huggingface_hub.
"""

import filecmp
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_checks import assert_one_line_error, hub_env
from hub_double import HubDouble

from quantcli.checkpoint import LOCAL_SOURCE_NAME

ALICE, BOB = "tok-alice-5f2c", "tok-bob-91aa"


@pytest.fixture
def hub():
    with HubDouble({ALICE: "alice", BOB: "bob"}) as double:
        yield double


@pytest.fixture
def cli(hub, tmp_path):
    """Run quantcli against the double; each call may ask for a fresh cache."""

    def run(*args, token=None, fresh_cache=False, stdin=None, python=None, env_extra=None):
        fresh = len(list(tmp_path.glob("hf-fresh-*")))
        home = tmp_path / (f"hf-fresh-{fresh}" if fresh_cache else "hf-home")
        env = hub_env(hub.url, home, token)
        env.update(env_extra or {})
        command = ["-c", python] if python else ["-m", "quantcli", *map(str, args)]
        result = subprocess.run(
            [sys.executable, *command],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for secret in (ALICE, BOB):  # a token never appears in anything quantcli prints
            assert secret not in result.stdout + result.stderr
        result.home = home
        return result

    return run


@pytest.fixture(scope="session")
def built_checkpoint(saved_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint") / "q"
    command = ["quantize", saved_models("llama"), "--out", out, "--bits", "4", "--scheme", "sym"]
    subprocess.run([sys.executable, "-m", "quantcli", *map(str, command)], check=True)
    return out


@pytest.fixture
def checkpoint(built_checkpoint, tmp_path):
    """A fresh copy per test: push writes the model card into the folder."""
    return Path(shutil.copytree(built_checkpoint, tmp_path / "q"))


def test_push_then_generate_from_the_hub_matches_the_local_folder(cli, checkpoint):
    pushed = cli("push", checkpoint, "alice/tiny-int4", token=ALICE)
    assert pushed.returncode == 0, pushed.stderr
    assert "Pushed to" in pushed.stdout and "/alice/tiny-int4" in pushed.stdout

    local = cli("generate", checkpoint, "Hello", "--max-new-tokens", "16", "--json")
    remote = cli(
        "generate", "alice/tiny-int4", "Hello", "--max-new-tokens", "16", "--json", fresh_cache=True
    )
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]

    snapshot = next((remote.home / "hub" / "models--alice--tiny-int4" / "snapshots").iterdir())
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert filecmp.cmp(snapshot / name, checkpoint / name, shallow=False), name


def test_generate_streams_text_and_reports_speed(cli, checkpoint):
    cli("push", checkpoint, "alice/tiny-int4", token=ALICE)
    result = cli("generate", "alice/tiny-int4", "-", "--max-new-tokens", "8", stdin="Hi there")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "tokens/s" in result.stderr


def test_private_repo_is_invisible_to_others(cli, checkpoint):
    assert cli("push", checkpoint, "alice/secret", "--private", token=ALICE).returncode == 0
    as_owner = cli(
        "generate", "alice/secret", "Hi", "--max-new-tokens", "2", token=ALICE, fresh_cache=True
    )
    assert as_owner.returncode == 0, as_owner.stderr
    for token in (BOB, None):
        result = cli("generate", "alice/secret", "Hi", token=token, fresh_cache=True)
        assert_one_line_error(
            result, 3, "alice/secret is neither a local folder nor a Hub repository"
        )


def test_wrong_or_missing_token(cli, checkpoint):
    wrong = cli("push", checkpoint, "alice/x", "--token", "hf_not_a_real_token")
    assert_one_line_error(wrong, 3, "the Hub rejected the token")
    assert "hf_not_a_real_token" not in wrong.stdout + wrong.stderr
    assert_one_line_error(cli("push", checkpoint, "alice/x"), 3, "no Hub token")
    assert_one_line_error(cli("push", checkpoint, "alice/x", token=BOB), 3, "refused the push")


def test_push_to_a_branch_leaves_main_alone(cli, checkpoint, hub):
    result = cli("push", checkpoint, "alice/tiny", "--revision", "dev", token=ALICE)
    assert result.returncode == 0, result.stderr
    repo = hub.state.repos["alice/tiny"]
    assert set(repo.refs) == {"main", "dev"}
    assert set(repo.commits[repo.refs["main"]].files) == {".gitattributes"}
    assert "model.safetensors" in repo.commits[repo.refs["dev"]].files
    from_branch = cli(
        "generate",
        "alice/tiny",
        "Hi",
        "--revision",
        "dev",
        "--max-new-tokens",
        "2",
        fresh_cache=True,
    )
    assert from_branch.returncode == 0, from_branch.stderr


def test_pushing_unchanged_files_makes_no_commit(cli, checkpoint, hub):
    assert cli("push", checkpoint, "alice/tiny", token=ALICE).returncode == 0
    commits = len(hub.state.repos["alice/tiny"].commits)
    again = cli("push", checkpoint, "alice/tiny", token=ALICE)
    assert again.returncode == 0 and "No changes" in again.stdout
    assert len(hub.state.repos["alice/tiny"].commits) == commits


def test_create_pr(cli, checkpoint, hub):
    result = cli("push", checkpoint, "alice/tiny", "--create-pr", token=ALICE)
    assert result.returncode == 0 and "/alice/tiny/discussions/1" in result.stdout
    assert "refs/pr/1" in hub.state.repos["alice/tiny"].refs


def test_quantize_from_the_hub_and_a_card_naming_the_base_model(cli, saved_models, hub, tmp_path):
    source = saved_models("llama")
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    upload = (
        "from huggingface_hub import HfApi; api = HfApi(); api.create_repo('alice/tiny-llama'); "
        f"api.upload_folder(folder_path={str(source)!r}, repo_id='alice/tiny-llama')"
    )
    uploaded = cli(token=ALICE, python=upload)
    (source / "README.md").unlink()
    assert uploaded.returncode == 0, uploaded.stderr

    out = tmp_path / "from-hub"
    quantized = cli("quantize", "alice/tiny-llama", "--out", out, "--json")
    assert quantized.returncode == 0, quantized.stderr
    assert cli("push", out, "alice/tiny-llama-int8", token=ALICE).returncode == 0

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "alice/tiny-llama"
    assert front["base_model_relation"] == "quantized"
    assert front["license"] == "apache-2.0"
    assert front["pipeline_tag"] == "text-generation"
    assert {"quantized", "int8", "compressed-tensors", "quantcli"} <= set(front["tags"])
    assert "quantcli quantize alice/tiny-llama --out" in card
    assert "vllm serve alice/tiny-llama-int8" in card
    assert 'quantcli.load("alice/tiny-llama-int8")' in card
    commit = hub.state.repos["alice/tiny-llama-int8"].refs["main"]
    assert "README.md" in hub.state.repos["alice/tiny-llama-int8"].commits[commit].files


def test_push_publishes_no_local_path(cli, checkpoint, hub, saved_models):
    """The local-source file eval reads is never uploaded; nothing pushed names a path."""
    assert (checkpoint / LOCAL_SOURCE_NAME).is_file()
    assert cli("push", checkpoint, "alice/tiny", token=ALICE).returncode == 0
    repo = hub.state.repos["alice/tiny"]
    files = repo.commits[repo.refs["main"]].files
    assert LOCAL_SOURCE_NAME not in files and "model.safetensors" in files
    source = str(saved_models("llama"))
    assert not [name for name, data in files.items() if source.encode() in data]
    card = files["README.md"].decode()
    assert f"`{saved_models('llama').name}`" in card and "source weights sha256" in card


def test_an_edited_card_is_kept_unless_asked(cli, checkpoint):
    cli("push", checkpoint, "alice/tiny", token=ALICE)
    card = checkpoint / "README.md"
    card.write_text(card.read_text().replace("# tiny", "# tiny, by hand"))
    kept = cli("push", checkpoint, "alice/tiny", token=ALICE)
    assert "kept (edited by you" in kept.stderr and "by hand" in card.read_text()
    replaced = cli("push", checkpoint, "alice/tiny", "--overwrite-card", token=ALICE)
    assert replaced.returncode == 0 and "by hand" not in card.read_text()


def test_eval_results_in_the_folder_reach_the_card(cli, checkpoint):
    (checkpoint / "quantcli_eval.json").write_text(json.dumps({"perplexity": 12.5}))
    assert cli("push", checkpoint, "alice/tiny", token=ALICE).returncode == 0
    assert "| perplexity | 12.5 |" in (checkpoint / "README.md").read_text()


def test_a_float_folder_is_not_pushed(cli, saved_models):
    result = cli("push", saved_models("opt"), "alice/float", token=ALICE)
    assert_one_line_error(result, 4, "is not a quantcli checkpoint (float)")


def test_missing_folder(cli, tmp_path):
    assert_one_line_error(cli("push", tmp_path / "nope", "alice/x", token=ALICE), 3, "no folder")


def test_hub_repo_not_found(cli):
    result = cli("generate", "alice/does-not-exist", "Hi", token=ALICE)
    assert_one_line_error(result, 3, "alice/does-not-exist is neither")


def test_revision_not_found(cli, checkpoint):
    cli("push", checkpoint, "alice/tiny", token=ALICE)
    result = cli("generate", "alice/tiny", "Hi", "--revision", "nope", fresh_cache=True)
    assert_one_line_error(result, 3, "has no revision 'nope'")


def test_empty_prompt(cli, checkpoint):
    assert_one_line_error(cli("generate", checkpoint, "   "), 2, "the prompt is empty")


# --- a Hub that stalls or drops connections: exit 3 within the documented time ----------


def upload(cli, folder, repo_id):
    """Put `folder` on the double as `repo_id` with huggingface_hub itself, not quantcli."""
    script = (
        "from huggingface_hub import HfApi; api = HfApi(); "
        f"api.create_repo({repo_id!r}); api.upload_folder(folder_path={str(folder)!r}, "
        f"repo_id={repo_id!r})"
    )
    uploaded = cli(token=ALICE, python=script)
    assert uploaded.returncode == 0, uploaded.stderr


def timed(run, *args, **kwargs):
    started = time.monotonic()
    result = run(*args, **kwargs)
    return result, time.monotonic() - started


def test_push_to_a_stalled_hub_stops_after_the_timeout(cli, checkpoint, hub):
    hub.state.fault = "stall"
    result, seconds = timed(cli, "--hub-timeout", "2", "push", checkpoint, "alice/x", token=ALICE)
    assert_one_line_error(result, 3, "the Hub did not answer in time")
    assert seconds < 20 and "--hub-timeout" in result.stderr


def test_quantizing_from_a_stalled_hub_stops_after_the_timeout(cli, hub, tmp_path):
    hub.state.fault = "stall"
    result, seconds = timed(
        cli,
        "quantize",
        "alice/tiny-llama",
        "--out",
        tmp_path / "q",
        env_extra={"QUANTCLI_HUB_TIMEOUT": "2"},
    )
    assert_one_line_error(result, 3, "cannot reach the Hub")
    assert seconds < 20 and not (tmp_path / "q").exists()


def test_a_connection_reset_during_download_is_exit_3(cli, hub, saved_models, tmp_path):
    upload(cli, saved_models("llama"), "alice/tiny-llama")
    hub.state.fault, hub.state.fault_prefix = "reset", "/alice/tiny-llama/resolve/"
    result = cli("quantize", "alice/tiny-llama", "--out", tmp_path / "q", fresh_cache=True)
    assert_one_line_error(result, 3, "dropped the connection")
    assert not (tmp_path / "q").exists()


def test_a_connection_reset_during_push_is_exit_3(cli, checkpoint, hub):
    hub.state.fault = "reset"
    result = cli("--hub-timeout", "2", "push", checkpoint, "alice/x", token=ALICE)
    assert_one_line_error(result, 3, "dropped the connection")


def test_a_hub_index_pointing_outside_the_repo_is_refused(cli, saved_models, tmp_path):
    source = shutil.copytree(saved_models("llama"), tmp_path / "hostile")
    index = {"weight_map": {"model.norm.weight": "../outside/x.safetensors"}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    upload(cli, source, "alice/hostile")
    result = cli("quantize", "alice/hostile", "--out", tmp_path / "q")
    assert_one_line_error(result, 4, "points outside the model folder")
    assert not (tmp_path / "q").exists()
