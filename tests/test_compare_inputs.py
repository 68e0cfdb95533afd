"""utils.compare's inputs, in-process over generated cases: metrics.jsonl (`read_metrics`,
one validator, and the eval keys of validation sets and tasks), config.json, --plot
(`check_plot_path`), and the token axis of a run whose local batch is below its global batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import compare
from utils.errors import UserError

FAST = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
GLOBAL_BATCH, LOCAL_BATCH, SEQ_LEN = 8, 2, 64  # 4 micro-steps per optimizer step, 1 rank


def records_of_a_split_batch_run() -> list[dict]:
    """What train.py logs for --global_batch 8 --local_batch 2 --seq_len 64: tokens_seen
    counts the whole global batch of every step, not one micro-batch."""
    train = [{"step": s, "loss": 7.0 - s / 10, "lr": 1e-3, "tokens_seen": s * GLOBAL_BATCH * SEQ_LEN,
              "tokens_per_s_per_gpu": 1000.0 + s, "mfu": None} for s in range(1, 7)]  # fmt: skip
    evals = [{"step": 3, "eval/c4_ppl": 900.0, "eval/c4_loss": 6.8, "eval/tokens": 252}]
    return train[:3] + evals + train[3:]


def write_run(root: Path, records: list[dict], name: str = "run", tail: str = "") -> Path:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    args = {"global_batch": GLOBAL_BATCH, "local_batch": LOCAL_BATCH, "seq_len": SEQ_LEN}
    (run / "config.json").write_text(json.dumps({"args": args}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def test_the_token_axis_counts_global_batches(tmp_path):
    run = compare.read_run(write_run(tmp_path, records_of_a_split_batch_run()))
    row = compare.summary(run)
    assert (row.main["steps"], row.main["tokens seen"]) == (6, 6 * GLOBAL_BATCH * SEQ_LEN)
    x, loss, _ = compare.curve([run], compare.LOSS_PANEL)
    assert x == [s * 512 for s in range(1, 7)]
    assert compare.curve([run], "c4") == ([3 * 512], [900.0], [0.0])
    # Logged before tokens_seen existed: from config.json, the same axis.
    old = [
        {k: v for k, v in r.items() if k != "tokens_seen"} for r in records_of_a_split_batch_run()
    ]
    run = compare.read_run(write_run(tmp_path, old, "old"))
    assert [run.tokens_seen(r) for r in run.train] == [s * 512 for s in range(1, 7)]


BAD_RECORDS = {
    "a list": ([1, 2], "holds a JSON list"),
    "no step": ({"loss": 3.0}, "has no `step`"),
    "loss a string": ({"step": 1, "loss": "3.0"}, "has loss"),
    "step a float": ({"step": 1.5, "loss": 3.0}, "has step"),
    "tokens_seen a string": ({"step": 1, "loss": 3.0, "tokens_seen": "10"}, "has tokens_seen"),
    "ppl a dict": ({"step": 1, "eval/c4_ppl": {}}, "has eval/c4_ppl"),
    "a set's ppl a string": ({"step": 1, "eval/wiki/ppl": "12"}, 'has eval/wiki/ppl "12", not a'),
    "bits per byte a bool": ({"step": 1, "eval/c4/bits_per_byte": True}, "has eval/c4/bits_"),
    "a task metric NaN": ({"step": 1, "eval/task/arc_easy/acc": math.nan}, "has eval/task/arc"),
    "a task metric a list": ({"step": 1, "eval/task/hellaswag/acc_norm": [1]}, "has eval/task/h"),
    "loss infinite": ({"step": 1, "loss": math.inf}, "has loss Infinity, not a finite number"),
    "step negative": ({"step": -1, "loss": 3.0}, "has step -1, not an integer >= 0"),
    "tokens_seen negative": ({"step": 1, "tokens_seen": -64}, "has tokens_seen -64, not an"),
    "ppl zero": ({"step": 1, "eval/c4/ppl": 0}, "has eval/c4/ppl 0, not a positive number"),
    "old ppl negative": ({"step": 1, "eval/c4_ppl": -3.5}, "has eval/c4_ppl -3.5, not a pos"),
    "bpb negative": ({"step": 1, "eval/w/bits_per_byte": -0.1}, "has eval/w/bits_per_byte -0.1"),
    "a set without a name": ({"step": 1, "eval//ppl": 12.0}, 'has "eval//ppl", not eval/NAME/'),
    "a set name with a slash": ({"step": 1, "eval/a/b/bits_per_byte": 1.0}, 'has "eval/a/b/bits'),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_bad_record_names_the_file_and_line(tmp_path, capsys, case):
    record, reason = BAD_RECORDS[case]
    good = records_of_a_split_batch_run()
    run = write_run(tmp_path, [*good[:2], record, *good[2:]])  # type: ignore[list-item]
    with pytest.raises(UserError) as err:
        compare.read_run(run)
    assert str(err.value).startswith(f"{run / 'metrics.jsonl'}: line 3 {reason}")
    with pytest.raises(SystemExit) as stop:
        compare.main([str(run)])
    assert stop.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_non_utf8_names_the_line_and_a_cut_last_line_is_still_left_out(tmp_path):
    run = write_run(tmp_path, records_of_a_split_batch_run())
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join([*lines[:4], b'{"step": 9, "loss": "\xff\xfe"}\n', *lines[4:]]))
    with pytest.raises(UserError, match=rf"{metrics}: line 5 is not UTF-8 text"):
        compare.read_run(run)
    # cut in the middle of a character, as a kill may leave it: left out
    metrics.write_bytes(b"".join(lines) + '{"step": 7, "loss": "\u00e9'.encode()[:-1])
    assert compare.read_run(run).train[-1]["step"] == 6


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
READ_EVAL_KEYS = st.sampled_from(
    ["eval/c4_ppl", "eval/c4/ppl", "eval/wiki/bits_per_byte", "eval/task/arc_easy/acc",
     "eval/task/arc_easy/acc_norm", "eval/task/task/acc"]
)  # fmt: skip
FIELDS = (
    st.sampled_from(["step", "loss", "tokens_seen", "mfu", "tokens_per_s_per_gpu", "lr"])
    | READ_EVAL_KEYS
    | st.sampled_from(["eval/c4/tokens", "eval/c4_loss", "eval/x/bytes"])
)


@FAST
@given(field=FIELDS, value=JSON_VALUES, cut=st.integers(0, 400), garbage=st.binary(max_size=30))
def test_any_metrics_file_reads_or_fails_in_one_line(tmp_path_factory, field, value, cut, garbage):
    """A field of any JSON type, the file cut at any length, garbage bytes in a line: compare
    either reads it and can summarize it, or raises one UserError naming the file and line."""
    root = tmp_path_factory.mktemp("m")
    records = records_of_a_split_batch_run()
    records[1] = {**records[1], field: value}
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    for content in (text[:cut], text[:cut] + garbage + b"\n" + text[cut:]):
        run = write_run(root, [])
        (run / "metrics.jsonl").write_bytes(content)
        try:
            run_read = compare.read_run(run)
        except UserError as err:
            assert "\n" not in str(err) and str(err).startswith(f"{run / 'metrics.jsonl'}: line ")
        else:
            compare.render_tables([compare.summary(run_read)])


def is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@FAST
@given(key=READ_EVAL_KEYS, value=JSON_VALUES | st.floats())
def test_an_eval_value_compare_shows_is_read_exactly_when_finite_or_null(
    tmp_path_factory, key, value
):
    """A validation set's ppl or bits per byte, or a task metric, of any JSON value: read when
    it is a finite number (a set's: positive) or null (the logger writes what is not finite as
    null), and shown in the table as it is; else one line naming the file, the line and the
    key."""
    root = tmp_path_factory.mktemp("e")
    record = {"step": 4, "tokens_seen": 2048, key: value}
    run = write_run(root, [*records_of_a_split_batch_run()[:3], record])
    kind = compare.parse_eval_key(key)[0]
    readable = value is None or (is_finite_number(value) and (kind == "task" or value > 0))
    try:
        row = compare.summary(compare.read_run(run))
    except UserError as err:
        assert not readable
        assert str(err).startswith(f"{run / 'metrics.jsonl'}: line 4 has {key} ")
        why = "a positive number" if is_finite_number(value) else "a finite number or null"
        assert str(err).endswith(f"not {why}; {compare.METRICS_FIX}")
    else:
        assert readable
        shown = {**row.sets, **row.tasks}
        kind, name, field = compare.parse_eval_key(key)
        column = {"ppl": f"{name} ppl", "bits_per_byte": f"{name} bpb"}.get(
            field, f"{name}/{field}"
        )
        assert shown[column] == value


SET_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]*", fullmatch=True)  # datas/eval_sets.py
NAME_PARTS = st.text(st.characters(blacklist_characters="/"), min_size=1, max_size=8)


@FAST
@given(
    name=SET_NAMES, field=st.sampled_from(compare.SET_FIELDS), task=NAME_PARTS, metric=NAME_PARTS
)
def test_eval_keys_name_their_set_or_task(name, field, task, metric):
    """Any set name train.py accepts (`task` too) and any task and metric name: each key is
    read as what it is, never as the other kind."""
    assert compare.parse_eval_key(f"eval/{name}/{field}") == ("set", name, field)
    assert compare.parse_eval_key(f"eval/task/{task}/{metric}") == ("task", task, metric)
    assert compare.parse_eval_key(f"eval/{name}/{field}x") is None
    assert compare.parse_eval_key(f"eval/{name}") is None


BAD_CONFIGS = {
    "not JSON": (b'{"args": ', " is not JSON; repair it"),
    "not UTF-8": (b'{"args": {"lr": "\xff"}}', " is not UTF-8 text; repair it"),
    "a list": (b"[1]", " holds a JSON list, not an object; repair it"),
    "args a string": (b'{"args": "lr=1"}', ": args is not an object; repair it"),
    "trainable a string": (
        b'{"args": {}, "parameters": {"trainable": "1M"}}',
        ': parameters.trainable is "1M", not an integer; repair it',
    ),
    "dense_model a float": (
        b'{"args": {}, "parameters": {"trainable": 1, "dense_model": 2.5}}',
        ": parameters.dense_model is 2.5, not an integer; repair it",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_json_names_the_file_and_the_field(tmp_path, capsys, case):
    content, message = BAD_CONFIGS[case]
    run = write_run(tmp_path, records_of_a_split_batch_run())
    (run / "config.json").write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        compare.main([str(run)])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {run / 'config.json'}{message}")


def test_a_directory_in_place_of_metrics_or_run(tmp_path):
    run = write_run(tmp_path, [])
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        compare.read_run(run)
    with pytest.raises(UserError, match="is not a directory"):
        compare.read_run(run / "config.json")


@pytest.mark.parametrize(
    "case",
    ["a directory", "unknown suffix", "the run's metrics", "the run's config", "under a file"],
)
def test_a_bad_plot_path_is_refused_before_anything_is_read(tmp_path, capsys, monkeypatch, case):
    run = write_run(tmp_path, records_of_a_split_batch_run())
    before = (run / "metrics.jsonl").read_bytes()
    (tmp_path / "file").write_text("x")
    plot, message = {
        "a directory": (tmp_path, "is a directory"),
        "unknown suffix": (tmp_path / "curves.pnj", "unknown image type '.pnj'"),
        "the run's metrics": (run / "metrics.jsonl", "metrics.jsonl; give an image path"),
        "the run's config": (run / "config.json", "config.json; give an image path"),
        "under a file": (tmp_path / "file" / "p.png", "lies under a file"),
    }[case]
    with pytest.raises(UserError, match=message):
        compare.check_plot_path(plot, [run])
    monkeypatch.setattr(
        compare, "read_run", lambda path: pytest.fail("read before --plot was checked")
    )
    with pytest.raises(SystemExit) as stop:
        compare.main([str(run), f"--plot={plot}"])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --plot {plot}")
    assert (run / "metrics.jsonl").read_bytes() == before
