"""Property-based fuzzing of the readers: any bytes, any JSON shape -> our own errors only, and every record counted."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from component.config.choices import PREFERENCE_FORMATS, SFT_FORMATS
from component.data.readers import read_preference_file, read_sft_file
from component.data.readers.records import DataFormatError

FIELDS = [
    "instruction", "input", "output", "history", "system", "conversations", "conversation", "messages", "chat",
    "prompt", "response", "chosen", "rejected", "target", "kind", "from", "value", "role", "content", "human",
    "assistant", "question", "response_chosen", "response_rejected", "tools", "type", "meta_instruction",
]  # fmt: skip
SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=list(HealthCheck)
)

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6) | values


def _read(path: Path, reader, fmt: str, skip_bad: bool) -> None:
    try:
        _, report = reader(str(path), fmt, skip_bad_records=skip_bad)
    except DataFormatError as error:
        assert str(path) in str(error)  # our error, naming the file
        return
    assert report.read == report.kept + sum(report.skipped.values()), report


def _write(suffix: str, data: bytes) -> Path:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


@SETTINGS
@given(
    data=st.binary(max_size=300),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".jsonl.gz"]),
    skip_bad=st.booleans(),
)
def test_random_bytes_raise_only_our_errors(data, suffix, skip_bad):
    path = _write(suffix, data)
    try:
        _read(path, read_sft_file, "auto", skip_bad)
        _read(path, read_preference_file, "auto", skip_bad)
    finally:
        path.unlink()


@SETTINGS
@given(
    rows=st.lists(records, min_size=1, max_size=6),
    sft_format=st.sampled_from(("auto", *SFT_FORMATS)),
    preference_format=st.sampled_from(("auto", *PREFERENCE_FORMATS)),
    as_array=st.booleans(),
    noise=st.sampled_from(["", "{broken\n", "\n\n", "[1, 2]\n"]),
)
def test_random_json_shapes_are_read_or_counted(rows, sft_format, preference_format, as_array, noise):
    if as_array:
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + noise
    path = _write(".json" if as_array else ".jsonl", text.encode("utf-8"))
    try:
        for skip_bad in (False, True):
            _read(path, read_sft_file, sft_format, skip_bad)
            _read(path, read_preference_file, preference_format, skip_bad)
    finally:
        path.unlink()
