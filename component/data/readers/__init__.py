"""Dataset readers: a publisher's file -> canonical records (`Conversation` for SFT, `PreferencePair` for
reward models and DPO), every record counted. One public API for both kinds:

- `records`: file containers, counts (`SourceReport`), `Skip`, `DataFormatError`, `iter_records`
- `fields`: field helpers shared by the record layouts
- `sft`, `preference`: the layouts, format detection and `read_sft_file` / `read_preference_file`
"""

from component.config.choices import MOSS_TOOL_MODES, PREFERENCE_FORMATS, SFT_FORMATS
from component.data.readers.preference import detect_preference_format, read_preference_file
from component.data.readers.records import DataFormatError, SourceReport, iter_records, utf8_error_position
from component.data.readers.sft import detect_sft_format, read_sft_file

__all__ = [
    "MOSS_TOOL_MODES",
    "PREFERENCE_FORMATS",
    "SFT_FORMATS",
    "DataFormatError",
    "SourceReport",
    "detect_preference_format",
    "detect_sft_format",
    "iter_records",
    "read_preference_file",
    "read_sft_file",
    "utf8_error_position",
]
