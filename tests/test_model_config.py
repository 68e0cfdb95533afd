"""The model config (`--config`: a preset, a config.json or its directory) is checked where it
is read, by utils.model's one validator: every damaged or inconsistent config is one UserError
line naming the file and what is wrong, raised before the model is built. The cases are
generated from the `tiny` preset's fields and run in this process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import tiny_run_flags, train_in_process
from utils.errors import UserError
from utils.model import NAMED_SHAPES, build_meta_model, load_model_config

BASE = {"model_type": "llama", **NAMED_SHAPES["tiny"]}
REQUIRED = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads"]  # fmt: skip

# The fields the validator checks, by the kind of value they take (the test's own table).
INTEGERS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings"]  # fmt: skip
NULLABLE_INTEGERS = ["num_key_value_heads", "head_dim"]
NUMBERS = ["rms_norm_eps", "rope_theta", "initializer_range", "attention_dropout"]
BOOLEANS = ["tie_word_embeddings", "attention_bias", "mlp_bias"]
WRONG = {"string": "64", "float": 64.5, "bool": True, "null": None, "list": [64], "dict": {"a": 64}}
WRONG_TYPES = (
    [(field, kind) for field in INTEGERS for kind in WRONG]
    + [(field, kind) for field in NULLABLE_INTEGERS for kind in WRONG if kind != "null"]
    + [(field, kind) for field in NUMBERS for kind in WRONG if kind != "float"]
    + [(field, kind) for field in BOOLEANS for kind in WRONG if kind != "bool"]
    + [("hidden_act", kind) for kind in WRONG if kind != "string"]
    + [("rope_scaling", kind) for kind in WRONG if kind not in ("null", "dict")]
)
OUT_OF_RANGE = (
    [(field, value) for field in INTEGERS for value in (0, -1, -4096)]
    + [("max_position_embeddings", 1), ("num_key_value_heads", 0), ("num_key_value_heads", -2)]
    + [("head_dim", value) for value in (0, -16, 1, 3, 15)]
    + [(field, value) for field in NUMBERS for value in (-1e-5, float("nan"), float("-inf"))]
    + [(field, 0) for field in ("rms_norm_eps", "rope_theta", "initializer_range")]
    + [(field, float("inf")) for field in NUMBERS]
    + [("attention_dropout", 1), ("attention_dropout", 1.5)]
    + [("hidden_act", value) for value in ("swiglu", "SILU", "")]
    + [("rope_scaling", value) for value in ({}, {"rope_type": "bogus"}, {"type": "ntk"},
                                             {"rope_type": "linear", "factor": 0.5},
                                             {"rope_type": "linear", "factor": "2"})]
)  # fmt: skip
MODEL_TYPES = ["gpt2", "t5", "bert", "mistral", "mixtral", "qwen2", "gemma", "Llama", "LLAMA",
               "llama ", "", "llama2", None, 1, True, ["llama"], {"llama": 1}]  # fmt: skip
NOT_OBJECTS = ["[]", "[{}]", json.dumps([BASE]), "null", "true", "0", "1.5", '"llama"']


def write(path: Path, values) -> Path:
    path.write_text(json.dumps(values, indent=2))
    return path


def refused(spec: Path | str, *words: str) -> str:
    """load_model_config's one-line UserError, which names the file and each of `words`."""
    with pytest.raises(UserError) as caught:
        load_model_config(str(spec), 0)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert str(spec) in message, message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------- what loads
@pytest.mark.parametrize("preset", list(NAMED_SHAPES))
def test_every_preset_loads(preset):
    config = load_model_config(preset, 0)
    assert (
        config.model_type == "llama" and config.hidden_size == NAMED_SHAPES[preset]["hidden_size"]
    )


def test_the_base_config_loads_as_the_tiny_preset_and_grows_to_the_tokenizer(tmp_path):
    from_file = load_model_config(str(write(tmp_path / "config.json", BASE)), 1024)
    from_dir = load_model_config(str(tmp_path), 0)
    preset = load_model_config("tiny", 0)
    assert from_file.vocab_size == 1024 and from_dir.vocab_size == preset.vocab_size == 256
    for field in REQUIRED + ["num_key_value_heads", "max_position_embeddings", "head_dim"]:
        assert getattr(from_file, field) == getattr(preset, field)


def test_a_config_as_save_pretrained_writes_it_loads(tmp_path):
    load_model_config("tiny", 0).save_pretrained(tmp_path)
    loaded, preset = load_model_config(str(tmp_path), 0), load_model_config("tiny", 0)
    loaded.name_or_path = preset.name_or_path = ""
    assert loaded.to_dict() == preset.to_dict()


def test_an_explicit_head_dim_sets_the_width_of_the_heads(tmp_path):
    shape = {"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": 16}
    config = load_model_config(str(write(tmp_path / "c.json", BASE | shape)), 0)
    model = build_meta_model(config, "sdpa")
    assert model.model.layers[0].self_attn.q_proj.out_features == 80


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kv=st.integers(1, 4), groups=st.integers(1, 3), half_width=st.integers(1, 8),
    explicit=st.booleans(), layers=st.integers(1, 3), mlp=st.integers(1, 300),
)  # fmt: skip
def test_any_consistent_shape_loads(tmp_path, kv, groups, half_width, explicit, layers, mlp):
    heads = kv * groups
    shape = {"hidden_size": heads * 2 * half_width, "num_attention_heads": heads,
             "num_key_value_heads": kv, "num_hidden_layers": layers, "intermediate_size": mlp}  # fmt: skip
    if explicit:
        shape |= {"head_dim": 2 * half_width, "hidden_size": 8}
    config = load_model_config(str(write(tmp_path / "c.json", BASE | shape)), 0)
    assert config.head_dim == 2 * half_width and config.num_key_value_heads == kv


# ---------------------------------------------------------------- what is refused
@pytest.mark.parametrize("field", REQUIRED)
def test_a_required_field_missing(tmp_path, field):
    values = {k: v for k, v in BASE.items() if k != field}
    refused(write(tmp_path / "config.json", values), field)


def test_only_a_model_type_names_every_missing_shape_field(tmp_path):
    """transformers would fill in its default 7B Llama."""
    refused(write(tmp_path / "config.json", {"model_type": "llama"}), *REQUIRED[1:])


@pytest.mark.parametrize(("field", "kind"), WRONG_TYPES)
def test_a_field_of_the_wrong_type(tmp_path, field, kind):
    refused(write(tmp_path / "config.json", BASE | {field: WRONG[kind]}), field)


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE, ids=str)
def test_a_field_out_of_range(tmp_path, field, value):
    refused(write(tmp_path / "config.json", BASE | {field: value}), field)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from(INTEGERS), value=st.integers(max_value=0))
def test_any_non_positive_size(tmp_path, field, value):
    refused(write(tmp_path / "config.json", BASE | {field: value}), field)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(heads=st.integers(1, 64), kv=st.integers(1, 64))
def test_kv_heads_that_do_not_divide_the_heads(tmp_path, heads, kv):
    values = BASE | {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 16}
    path = write(tmp_path / "config.json", values)
    if heads % kv:
        refused(path, "num_attention_heads", "num_key_value_heads")
    else:
        load_model_config(str(path), 0)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(hidden=st.integers(1, 4096), heads=st.integers(1, 64))
def test_a_hidden_size_the_heads_do_not_split_into_even_widths(tmp_path, hidden, heads):
    """5 heads on 64 would attend 60 wide; an odd width cannot be rotated."""
    values = BASE | {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": 1}
    path = write(tmp_path / "config.json", values)
    if hidden % heads or hidden // heads % 2:
        refused(path, "hidden_size", "num_attention_heads")
    else:
        assert load_model_config(str(path), 0).head_dim * heads == hidden


def test_five_heads_on_64(tmp_path):
    shape = {"num_attention_heads": 5, "num_key_value_heads": 5}
    refused(write(tmp_path / "config.json", BASE | shape), "hidden_size", "head_dim")


@pytest.mark.parametrize("model_type", MODEL_TYPES, ids=str)
def test_an_unsupported_model_type(tmp_path, model_type):
    refused(write(tmp_path / "config.json", BASE | {"model_type": model_type}), "model_type")


@pytest.mark.parametrize("text", NOT_OBJECTS)
def test_a_json_value_that_is_not_an_object(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    refused(tmp_path / "config.json", "JSON object")


def test_the_file_cut_at_every_length(tmp_path):
    text = json.dumps(BASE | {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}, indent=2)
    for length in range(len(text)):
        (tmp_path / "config.json").write_text(text[:length])
        refused(tmp_path / "config.json", "not a readable model config", "not JSON")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200))
def test_garbage_bytes(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    refused(tmp_path / "config.json")


@pytest.mark.parametrize(
    "data",
    [
        json.dumps(BASE).encode("utf-16"),
        json.dumps(BASE | {"name": "modèle"}, ensure_ascii=False).encode("latin-1"),
        b"\xff" + json.dumps(BASE).encode(),
        json.dumps(BASE).encode()[:-1] + b"\x80}",
    ],
    ids=["utf-16", "latin-1", "leading 0xff", "stray continuation byte"],
)
def test_not_utf8(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    refused(tmp_path / "config.json", "not UTF-8")


def test_a_utf8_byte_order_mark_is_read(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(BASE).encode())
    assert load_model_config(str(tmp_path / "config.json"), 0).hidden_size == 64


def test_a_number_or_a_nesting_json_cannot_hold(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": ' + "9" * 5000 + "}")
    refused(tmp_path / "config.json", "not a readable model config")
    (tmp_path / "config.json").write_text("[" * 100_000)
    refused(tmp_path / "config.json", "not a readable model config")


def test_a_directory_where_the_file_should_be(tmp_path):
    (tmp_path / "config.json").mkdir()
    refused(tmp_path / "config.json", "is a directory")
    message = refused(tmp_path, "config.json is a directory")  # the directory holding it
    assert "not found" not in message and "does not exist" not in message


def test_a_directory_without_config_json(tmp_path):
    refused(tmp_path, "is a directory with no config.json file", "not found")


def test_a_path_that_is_not_a_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    message = refused(tmp_path / "fifo", "not a regular file")
    assert "not found" not in message and "does not exist" not in message


def test_a_missing_path_and_an_unreadable_file(tmp_path):
    refused(tmp_path / "missing.json", "not found", "llama-60m")
    if os.geteuid() != 0:  # root reads any file
        path = write(tmp_path / "config.json", BASE)
        path.chmod(0)
        refused(path, "cannot be read")


def test_a_message_of_transformers_with_a_newline_is_one_line(tmp_path):
    values = BASE | {"problem_type": "regression\nor not"}
    refused(write(tmp_path / "config.json", values), "refused by transformers", "regression or")


def test_a_rope_scaling_transformers_refuses(tmp_path):
    values = BASE | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    refused(write(tmp_path / "config.json", values), "rope_scaling")


# ---------------------------------------------------------------- through train.py, in process
@pytest.mark.parametrize(
    ("values", "words"),
    [({"model_type": "llama"}, ["missing hidden_size"]), ([], ["holds a list"])],
    ids=["only model_type", "a list"],
)
def test_train_refuses_before_building_the_model(
    values, words, mds_tokens, tokenizer_dir, tmp_path, capsys, monkeypatch
):
    import train

    def not_now(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(train, "build_model", not_now)
    config = write(tmp_path / "config.json", values)
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path / "runs", steps=4, num_workers=0)
    with pytest.raises(SystemExit) as stop:
        train_in_process(*flags, f"--config={config}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --config {config}") and all(w in lines[0] for w in words)


# ---------------------------------------------------------------- the slt config
def test_an_slt_config_that_is_not_utf8(tmp_path):
    from slt.config import load_slt_config

    path = tmp_path / "slt.json"
    path.write_bytes(b'{"method": "magnitude", "x": "\xe9"}')
    with pytest.raises(UserError, match="is not UTF-8"):
        load_slt_config(str(path))
