"""Safety against hostile or broken input (issue #17): quantcli never destroys a source or a
folder it did not write, never reads a file outside the model it was given, never publishes
a local path, and refuses malformed headers, indexes and configs by name.

Each case runs the command line in this process and checks the exit code, the one line on
stderr, and what is on disk afterwards."""

import hashlib
import io
import json
import os
import shutil
import struct
import sys

import pytest
import torch
from cli_checks import (
    assert_one_line_error,
    fingerprint,
    quantized_checkpoint,
    run_main,
    run_quantcli,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantcli.checkpoint import LOCAL_SOURCE_NAME

SECRET = "hf_SecretTokenThatMustNeverBeCopied"


@pytest.fixture
def source(saved_models, tmp_path):
    """A private copy of the tiny Llama, free to be broken."""
    return shutil.copytree(saved_models("llama"), tmp_path / "src")


@pytest.fixture
def quantize(monkeypatch, capsys):
    def run(*args):
        return run_main(monkeypatch, capsys, "quantize", *args)

    return run


# --- output safety ----------------------------------------------------------------------


def test_out_equal_to_the_source_is_refused_even_with_overwrite(source, quantize):
    before = fingerprint(source)
    for flags in ([], ["--overwrite"]):
        assert_one_line_error(
            quantize(source, "--out", source, *flags), 2, "would destroy the source"
        )
    assert fingerprint(source) == before


def test_out_inside_the_source_is_refused(source, quantize):
    before = fingerprint(source)
    assert_one_line_error(
        quantize(source, "--out", source / "int8", "--overwrite"), 2, "would destroy the source"
    )
    assert fingerprint(source) == before and not (source / "int8").exists()


def test_out_holding_the_source_is_refused(saved_models, tmp_path, quantize):
    nested = shutil.copytree(saved_models("llama"), tmp_path / "m" / "sub")
    before = fingerprint(tmp_path)
    assert_one_line_error(
        quantize(nested, "--out", tmp_path / "m", "--overwrite"), 2, "would destroy the source"
    )
    assert fingerprint(tmp_path) == before


def test_out_linking_to_the_source_is_refused(source, tmp_path, quantize):
    (tmp_path / "alias").symlink_to(source, target_is_directory=True)
    before = fingerprint(source)
    assert_one_line_error(
        quantize(source, "--out", tmp_path / "alias", "--overwrite"),
        2,
        "would destroy the source",
    )
    assert fingerprint(source) == before


def user_folder(out):
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")


def link_to_user_folder(out):
    user_folder(out.parent / "mine")
    out.symlink_to(out.parent / "mine", target_is_directory=True)


def hidden_files_only(out):
    out.mkdir()
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")


NOT_QUANTCLI_OUTPUTS = {
    "folder of user files": user_folder,
    "file": lambda out: out.write_text("notes"),
    "link to a folder of user files": link_to_user_folder,
    "folder of hidden files only": hidden_files_only,
    "another float model": lambda out: shutil.copytree(out.parent / "src", out),
    "folder with a config.json only": lambda out: (
        out.mkdir(),
        (out / "config.json").write_text("{}"),
    ),
}


@pytest.mark.parametrize("kind", NOT_QUANTCLI_OUTPUTS)
def test_overwrite_refuses_what_quantcli_did_not_write(source, tmp_path, quantize, kind):
    out = tmp_path / "out"
    NOT_QUANTCLI_OUTPUTS[kind](out)
    before = fingerprint(tmp_path)
    assert_one_line_error(
        quantize(source, "--out", out, "--overwrite"), 2, "is not a quantcli output"
    )
    assert fingerprint(tmp_path) == before


def test_overwrite_replaces_an_empty_folder_and_a_quantcli_output(source, tmp_path, quantize):
    out = tmp_path / "out"
    out.mkdir()
    assert quantize(source, "--out", out, "--overwrite", "--json").returncode == 0
    first = fingerprint(out)
    result = quantize(source, "--out", out, "--overwrite", "--bits", "4", "--json")
    assert result.returncode == 0, result.stderr
    assert fingerprint(out) != first and sorted(p.name for p in tmp_path.iterdir()) == [
        "out",
        "src",
    ]


def test_a_failed_overwrite_keeps_the_old_output(source, tmp_path, quantize, monkeypatch):
    from quantcli.models import streaming

    out = tmp_path / "out"
    assert quantize(source, "--out", out, "--json").returncode == 0
    before = fingerprint(out)

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming, "_write_shards", broken)
    assert_one_line_error(quantize(source, "--out", out, "--overwrite"), 5, "filled up")
    assert fingerprint(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --- containment: links, index entries, special files -----------------------------------


def write_index(source, shard):
    """An index that puts every tensor of the source's model.safetensors in `shard`."""
    with safe_open(source / "model.safetensors", "pt") as f:
        index = {"weight_map": dict.fromkeys(f.keys(), shard)}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(SECRET)
    return path


@pytest.mark.parametrize("name", ["LICENSE", "vocab.txt", "config.json", "README.md"])
def test_a_side_file_linking_outside_is_refused(source, tmp_path, token_file, quantize, name):
    (source / name).unlink(missing_ok=True)
    (source / name).symlink_to(token_file)
    result = quantize(source, "--out", tmp_path / "q")
    assert_one_line_error(result, 4, f"{name} leads outside the model folder")
    assert SECRET not in result.stderr and not (tmp_path / "q").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "token"]


def test_a_link_to_a_system_file_is_refused_by_every_command(source, tmp_path, monkeypatch):
    (source / "vocab.txt").symlink_to("/etc/passwd")
    for command in (["inspect", source], ["load", source], ["generate", source, "hi"]):
        assert_one_line_error(run_quantcli(*command), 4, "vocab.txt leads outside")


def test_weights_linking_outside_are_refused(source, tmp_path, quantize):
    outside = tmp_path / "elsewhere.safetensors"
    (source / "model.safetensors").rename(outside)
    (source / "model.safetensors").symlink_to(outside)
    result = quantize(source, "--out", tmp_path / "q")
    assert_one_line_error(result, 4, "model.safetensors leads outside the model folder")
    assert not (tmp_path / "q").exists()


def test_links_inside_the_folder_are_followed_and_copied_as_files(source, tmp_path, quantize):
    (source / "licenses").mkdir()
    (source / "licenses" / "apache.txt").write_text("Apache License 2.0")
    (source / "LICENSE").symlink_to("licenses/apache.txt")
    (source / "weights").mkdir()
    (source / "model.safetensors").rename(source / "weights" / "real.safetensors")
    (source / "model.safetensors").symlink_to("weights/real.safetensors")
    result = quantize(source, "--out", tmp_path / "q", "--json")
    assert result.returncode == 0, result.stderr
    copied = tmp_path / "q" / "LICENSE"
    assert not copied.is_symlink() and copied.read_text() == "Apache License 2.0"


@pytest.mark.parametrize(
    "entry", ["../outside/x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors"]
)
def test_an_index_pointing_outside_is_refused(source, tmp_path, quantize, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(source / "model.safetensors", outside / "x.safetensors")
    write_index(source, entry)
    (source / "model.safetensors").unlink()
    result = quantize(source, "--out", tmp_path / "q")
    assert_one_line_error(result, 4, "points outside the model folder")
    assert not (tmp_path / "q").exists()


def test_an_index_entry_linking_outside_is_refused(source, tmp_path, quantize):
    write_index(source, "shard.safetensors")
    outside = tmp_path / "x.safetensors"
    (source / "model.safetensors").rename(outside)
    (source / "shard.safetensors").symlink_to(outside)
    result = quantize(source, "--out", tmp_path / "q")
    assert_one_line_error(result, 4, "shard.safetensors leads outside")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_fifo_is_refused_without_blocking(source, tmp_path, name):
    (source / name).unlink()
    os.mkfifo(source / name)
    result = run_quantcli("quantize", source, "--out", tmp_path / "q", timeout=60)
    assert_one_line_error(result, 4, f"{name} is not a regular file")
    assert not (tmp_path / "q").exists()


# --- privacy: what the output records about the source ---------------------------------


def test_a_local_source_is_recorded_by_name_and_digest_never_by_path(source, tmp_path, quantize):
    out = tmp_path / "out"
    assert quantize(source, "--out", out, "--token", SECRET, "--json").returncode == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    weights = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert (metadata["source_model"], metadata["source_sha256"]) == ("src", weights)
    assert (
        metadata["source_revision"] == ""
        and "quantcli quantize src --out out" in (metadata["quantcli_command"])
    )
    local = out / LOCAL_SOURCE_NAME  # for eval, kept out of every upload
    assert json.loads(local.read_text()) == {"path": str(source.resolve())}
    for path in out.iterdir():
        if path != local:
            content = path.read_bytes()
            assert str(tmp_path).encode() not in content and SECRET.encode() not in content


@pytest.mark.parametrize(
    ("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)]
)
def test_outputs_get_the_permissions_the_umask_gives(
    source, tmp_path, quantize, umask, folder_mode, file_mode
):
    previous = os.umask(umask)
    try:
        assert quantize(source, "--out", tmp_path / "out", "--json").returncode == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == folder_mode
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == file_mode, path.name


# --- strict reading: headers, indexes, config fields, shapes ----------------------------


def raw_header(folder, header_json: str, data: bytes = b"\0" * 8):
    """Replace the weights by a file with this literal header (duplicates stay duplicate)."""
    encoded = header_json.encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_config(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))

    return change


def replace_tensor(name, tensor):
    def change(folder):
        tensors = load_file(folder / "model.safetensors")
        tensors[name] = tensor
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return change


def add_tensor(name):
    def change(folder):
        tensors = load_file(folder / "model.safetensors")
        tensors[name] = torch.ones(64)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return change


def drop_tensor(name):
    def change(folder):
        tensors = load_file(folder / "model.safetensors")
        del tensors[name]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return change


def two_shards_with_one_tensor(folder):
    shutil.copy(folder / "model.safetensors", folder / "model-b.safetensors")
    (folder / "model.safetensors").rename(folder / "model-a.safetensors")


def index_naming_a_ghost(folder):
    write_index(folder, "model.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def index_naming(name):
    def change(folder):
        write_index(folder, "model.safetensors")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"][name] = "model.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return change


def index_with_a_number(folder):
    write_index(folder, "model.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = 7
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def f32(start, end):
    """A header entry for two float32 values at these offsets."""
    return json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [start, end]})


STRICT_CASES = {  # name: (change to the source, exit code, fragment of the one line)
    "duplicate tensor name": (
        lambda f: raw_header(f, f'{{"a":{f32(0, 8)},"a":{f32(0, 8)}}}'),
        4,
        "names 'a' twice",
    ),
    "overlapping offsets": (
        lambda f: raw_header(f, f'{{"a":{f32(0, 8)},"b":{f32(4, 12)}}}', b"\0" * 12),
        4,
        "invalid offset",
    ),
    "metadata as a list": (
        lambda f: raw_header(f, f'{{"__metadata__":["x"],"a":{f32(0, 8)}}}'),
        4,
        "model.safetensors is truncated or corrupt",
    ),
    "deeply nested header": (
        lambda f: raw_header(f, '{"a":' + "[" * 5000 + "]" * 5000 + "}"),
        4,
        "recursion limit",
    ),
    "unknown dtype": (
        lambda f: raw_header(f, f'{{"a":{f32(0, 8).replace("F32", "Q4")}}}'),
        4,
        "Q4",
    ),
    "sub-byte dtype": (
        lambda f: raw_header(f, '{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', b"\0"),
        4,
        "dtype F4, which quantcli cannot read",
    ),
    "tensor in two shards": (two_shards_with_one_tensor, 4, "is in both model-a.safetensors"),
    "index names a missing tensor": (
        index_naming_a_ghost,
        4,
        "puts tensor 'model.ghost.weight' in model.safetensors, which does not hold it",
    ),
    "index value not a string": (index_with_a_number, 4, "must be a file name, not 7"),
    "hidden_size as a string": (edit_config(hidden_size="64"), 4, "'hidden_size' expected int"),
    "vocab_size as a float": (edit_config(vocab_size=128.5), 4, "'vocab_size' expected int"),
    "negative size": (edit_config(vocab_size=-1), 4, "does not describe a buildable"),
    "pad_token_id beyond the vocabulary": (
        edit_config(pad_token_id=128),
        4,
        "(AssertionError: Padding_idx must be within num_embeddings)",
    ),
    "layer count that would take minutes to build": (
        edit_config(num_hidden_layers=65536),
        4,
        "'num_hidden_layers' is 65536, more layers than any model has",
    ),
    "architectures disagreeing with model_type": (
        edit_config(architectures=["GPT2LMHeadModel"]),
        4,
        "GPT2LMHeadModel, a 'gpt2' model, but model_type is 'llama'",
    ),
    "architectures as a string": (
        edit_config(architectures="LlamaForCausalLM"),
        4,
        "'architectures' must be a list",
    ),
    "linear weight disagreeing with the config": (
        replace_tensor("model.layers.0.mlp.up_proj.weight", torch.zeros(100, 64)),
        4,
        "'model.layers.0.mlp.up_proj.weight' has shape [100, 64] but config.json implies",
    ),
    "norm disagreeing with the config": (
        replace_tensor("model.norm.weight", torch.zeros(65)),
        4,
        "'model.norm.weight' has shape [65]",
    ),
    "tensor the config does not describe": (
        add_tensor("model.layers.0.mlp.extra.weight"),
        4,
        "holds tensor 'model.layers.0.mlp.extra.weight', which config.json does not describe",
    ),
    "norm weight missing": (
        drop_tensor("model.norm.weight"),
        4,
        "lacks tensor 'model.norm.weight', which the model needs",
    ),
    "untied output head missing": (
        drop_tensor("lm_head.weight"),
        4,
        "lacks tensor 'lm_head.weight', which the model needs",
    ),
    "linear weight missing": (
        drop_tensor("model.layers.1.self_attn.o_proj.weight"),
        4,
        "lacks tensor 'model.layers.1.self_attn.o_proj.weight'",
    ),
    "control character in a tensor name": (
        index_naming("model.norm.weight\x85"),
        4,
        "puts tensor 'model.norm.weight\\x85' in model.safetensors",
    ),
    "terminal escape in a tensor name": (
        index_naming("\x1b]0;pwned\x07"),
        4,
        "puts tensor '\\x1b]0;pwned\\x07'",
    ),
    "dtype a list": (edit_config(dtype=[]), 4, "cannot read"),
    "integer linear weight": (
        replace_tensor("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64).to(torch.uint16)),
        4,
        "expected a floating-point weight, got torch.uint16",
    ),
}


@pytest.mark.parametrize("case", STRICT_CASES)
def test_strict_reading(case, source, tmp_path, quantize):
    change, code, fragment = STRICT_CASES[case]
    change(source)
    assert_one_line_error(quantize(source, "--out", tmp_path / "q"), code, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_tied_head_may_be_absent_and_a_legacy_buffer_is_dropped(source, tmp_path, quantize):
    """Not every absent or extra tensor is an error: a head tied to the embeddings is the
    embeddings (transformers saves it once), and an old checkpoint's rotary_emb.inv_freq is
    a buffer transformers now computes and ignores in files."""
    edit_config(tie_word_embeddings=True)(source)
    drop_tensor("lm_head.weight")(source)
    add_tensor("model.layers.0.self_attn.rotary_emb.inv_freq")(source)
    assert quantize(source, "--out", tmp_path / "q", "--json").returncode == 0
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        written = set(f.keys())
    assert "lm_head.weight" not in written
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in written  # load would refuse it


@pytest.mark.parametrize("command", ["inspect", "load"])
@pytest.mark.parametrize(
    ("field", "value"),
    [("num_bits", 4.0), ("num_bits", True), ("group_size", []), ("group_size", "32")],
)
def test_a_quantization_setting_that_is_no_integer_is_refused(
    checkpoint, monkeypatch, capsys, command, field, value
):
    """8.0 == 8 and True == 1 in Python: only a real integer is a bit width or group size."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"][field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    before = fingerprint(checkpoint)
    result = run_main(monkeypatch, capsys, command, checkpoint)
    assert_one_line_error(result, 4, f"'{field}' must be an integer, not {value!r}")
    assert fingerprint(checkpoint) == before


def test_an_fp8_source_is_read_and_widened_to_bf16(source, tmp_path, quantize):
    tensors = load_file(source / "model.safetensors")
    fp8 = {name: tensor.to(torch.float8_e4m3fn) for name, tensor in tensors.items()}
    save_file(fp8, source / "model.safetensors", metadata={"format": "pt"})
    assert quantize(source, "--out", tmp_path / "q", "--json").returncode == 0
    written = load_file(tmp_path / "q" / "model.safetensors")
    assert written["model.norm.weight"].dtype == torch.bfloat16
    assert written["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert written["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32


# --- leftovers of --allow-pickle conversion ---------------------------------------------


@pytest.fixture
def pickle_source(source):
    tensors = load_file(source / "model.safetensors")
    torch.save(tensors, source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    return source


def test_a_dead_runs_conversion_folder_is_removed_by_the_next_run(
    pickle_source, tmp_path, quantize
):
    dead = tmp_path / ".q.unpickled-999999999-abc"  # no such process: a SIGKILLed run's
    dead.mkdir()
    (dead / "pytorch_model.safetensors").write_bytes(b"float copy")
    result = quantize(pickle_source, "--out", tmp_path / "q", "--allow-pickle", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]


def test_a_full_disk_during_conversion_is_exit_5(pickle_source, tmp_path, quantize, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = quantize(pickle_source, "--out", tmp_path / "q", "--allow-pickle")
    assert_one_line_error(result, 5, "filled up")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_too_little_space_for_the_conversion_is_refused_first(
    pickle_source, tmp_path, quantize, monkeypatch
):
    from quantcli.models import streaming

    usage = streaming.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    result = quantize(pickle_source, "--out", tmp_path / "q", "--allow-pickle")
    assert_one_line_error(result, 5, "needs about")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- input problems that are the user's or the checkpoint's, never a bug (exit 1) -------


@pytest.fixture
def checkpoint(saved_models, tmp_path):
    """A private int4 checkpoint of the tiny Llama, free to be broken."""
    return quantized_checkpoint(saved_models, tmp_path / "int4")


NOT_TOKENIZERS = {
    "JSON object of something else": b'{"hello": 1}',
    "JSON list": b"[]",
    "model of the wrong type": b'{"version": "1.0", "model": 7}',
    "binary": b"\xff\xfe\x00junk",
}
READERS = {  # the commands that read the tokenizer, with what they need to run
    "generate": ["generate", "{}", "hi", "--max-new-tokens", "2"],
    "eval": ["eval", "{}", "--no-baseline", "--no-save", "--max-tokens", "16"],
}


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("content", NOT_TOKENIZERS)
def test_a_tokenizer_json_that_is_no_tokenizer_is_named(
    checkpoint, monkeypatch, capsys, command, content
):
    (checkpoint / "tokenizer.json").write_bytes(NOT_TOKENIZERS[content])
    before = fingerprint(checkpoint)
    args = [str(checkpoint) if arg == "{}" else arg for arg in READERS[command]]
    assert_one_line_error(run_main(monkeypatch, capsys, *args), 4, "tokenizer.json in")
    assert fingerprint(checkpoint) == before


def test_quantize_copies_a_broken_tokenizer_and_warns(source, tmp_path, quantize):
    """Copied, not refused: quantize is about the weights, and a tokenizer this `tokenizers`
    cannot parse may suit a newer one; the warning comes now, not at the first generate."""
    (source / "tokenizer.json").write_bytes(NOT_TOKENIZERS["JSON object of something else"])
    result = quantize(source, "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    assert "Warning: tokenizer.json in" in result.stderr and "copied it as it is" in result.stderr
    assert (tmp_path / "q" / "tokenizer.json").read_bytes() == (
        source / "tokenizer.json"
    ).read_bytes()


CHAT_TEMPLATES = {  # template: (exit code, fragment)
    "{% for m in messages %}{{ m.content ": (4, "chat template is broken (TemplateSyntaxError"),
    "{{ messages[5].content }}": (4, "chat template is broken (UndefinedError"),
    "{{ messages[0].content.x.y }}": (4, "chat template is broken (UndefinedError"),
    "{{ '' }}": (4, "turns the prompt into nothing"),
    "{{ raise_exception('no system role') }}": (2, "refuses this prompt (no system role)"),
}


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_a_bad_chat_template_is_one_line(checkpoint, monkeypatch, capsys, template):
    (checkpoint / "chat_template.jinja").write_text(template)
    code, fragment = CHAT_TEMPLATES[template]
    result = run_main(monkeypatch, capsys, "generate", checkpoint, "hi", "--max-new-tokens", "2")
    assert_one_line_error(result, code, fragment)
    assert "--no-chat" in result.stderr


@pytest.mark.parametrize(
    ("data", "byte"), [(b"\xff\xfe\x80", "0xff"), (b"caf\xe9", "0xe9"), (b"hi \x80", "0x80")]
)
def test_binary_stdin_is_a_usage_error(checkpoint, monkeypatch, capsys, data, byte):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    result = run_main(monkeypatch, capsys, "generate", checkpoint, "-", "--no-chat")
    assert_one_line_error(result, 2, f"the prompt on stdin is not UTF-8 text (byte {byte}")


@pytest.mark.parametrize("command", ["load", "generate", "eval"])
@pytest.mark.parametrize(
    ("device", "problem"),
    [
        ("cuda", "needs a GPU, but this torch has no CUDA or sees no GPU"),
        ("cuda:7", "needs a GPU, but this torch has no CUDA or sees no GPU"),
        ("foo", "is not a device name"),
        ("", "is not a device name"),
        ("meta", "is not available here"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_first(
    checkpoint, monkeypatch, capsys, command, device, problem
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch
    args = {"load": [], "generate": ["hi"], "eval": ["--no-baseline"]}[command]
    result = run_main(monkeypatch, capsys, command, checkpoint, *args, "--device", device)
    assert_one_line_error(result, 2, f"--device {device} {problem}: use one of cpu.")
