"""The one settings parser of every entry point: a JSON file plus `--key value` overrides, type-checked.

Training recipes name their file with `--train_args_file`, the other front ends with `--config`; either way
the keys are the fields of the entry point's dataclasses, the command line wins over the file, unknown keys
name the closest valid key, and a value of the wrong type names the key and where it came from (the file or
the command line). Nothing heavy is imported here, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from component.config.errors import EXIT_IO, UserFacingError


class ConfigError(UserFacingError, ValueError):
    """A settings file or override that cannot work; the message names the key (and the file, if any)."""

    label = "config error"


class HelpRequested(Exception):
    """`--help` was given: the entry point prints its key list and exits 0."""


def closest(key: str, valid: list[str]) -> str:
    """' Did you mean 'x'?' for the closest valid name, or ''."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def choices(*values: Any, help: str = "") -> dict:
    """Field metadata of a key with a fixed set of values (checked by the parser, listed in errors)."""
    return {"choices": values, "help": help or "One of " + ", ".join(json.dumps(v) for v in values) + "."}


def check_value(where: str, value: Any, annotation: Any, from_cli: bool) -> Any:
    """Check a JSON value (or convert a command-line string) against a dataclass field annotation.

    `where` names the setting in the error message, e.g. "config/x.json: 'lora_rank'" or "--top_p".
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if (value is None or (from_cli and value in ("null", "None"))) and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_value(where, value, option, from_cli)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where} must not be null")
    if annotation is Any:
        if from_cli and value in ("null", "None"):  # `--eval_file null` means none, not a file named null
            return None
        return json.loads(value) if from_cli and value[:1] in "[{" else value
    if origin in (list, tuple):
        if from_cli and isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        return [check_value(where, item, item_type, from_cli) for item in value]
    if origin is dict or annotation is dict:
        if from_cli and isinstance(value, str) and value.lstrip().startswith("{"):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a JSON object, got {value!r}")
        return value
    if annotation is bool:
        if from_cli and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if from_cli and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = annotation(value)
        kinds = (int,) if annotation is int else (int, float)  # an int stays an int: warmup_steps 20 vs 0.03
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ConfigError(f"{where} must be {'an integer' if annotation is int else 'a number'}, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type) and issubclass(annotation, str):  # str-valued enums of TrainingArguments
        return annotation(value).value if hasattr(annotation, "_value2member_map_") else value
    return value  # other TrainingArguments types: TrainingArguments validates them itself


def fields_of(*classes: type) -> dict[str, dataclasses.Field]:
    """The init fields of dataclasses, with their annotations resolved; earlier classes win a shared name."""
    result: dict[str, dataclasses.Field] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and f.name not in result:
                f.type = hints.get(f.name, f.type)
                result[f.name] = f
    return result


def split_argv(argv: list[str], file_flag: str) -> tuple[str | None, dict[str, str | list[str]]]:
    """`[--FILE_FLAG F] [--key value | --key=value | --flag ...]` -> (F or None, {key: raw string}).

    A key given more than once collects its values in a list (e.g. `--adapter sft=A --adapter dpo=B`).
    """
    settings_file = None
    overrides: dict[str, str | list[str]] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            raise HelpRequested
        if not token.startswith("--"):
            raise ConfigError(f"expected --key value, got {token!r}")
        key, equals, inline = token[2:].partition("=")
        if equals:
            value = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag
            i += 1
        if key == file_flag:
            settings_file = value
        elif key in overrides:
            previous = overrides[key]
            overrides[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            overrides[key] = value
    return settings_file, overrides


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """A JSON object from a settings file; errors name the file (and line:column for bad JSON)."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{what} {path!r} is a folder, not a JSON file")
    if not file.is_file():
        raise ConfigError(f"{what} {path!r} does not exist")
    try:
        raw = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings")
    return raw


def is_note(key: str) -> bool:
    """Keys that hold notes inside JSON files: `_anything` and `comment`."""
    return key.startswith("_") or key == "comment"


def check_settings(
    fields: dict[str, dataclasses.Field],
    from_file: dict[str, Any],
    from_cli: dict[str, str],
    source: str,
    prog: str = "",
) -> dict[str, Any]:
    """Typed, choice-checked values of file keys then command-line keys (which win)."""
    values: dict[str, Any] = {}
    entries = [(key, value, False) for key, value in from_file.items() if not is_note(key)]
    entries += [(key, value, True) for key, value in from_cli.items()]
    for key, value, cli in entries:
        spec = fields.get(key)
        if spec is None:
            hint = closest(key, list(fields))
            if cli:
                raise ConfigError(f"unknown option '--{key}'.{hint} (see {prog or 'the script'} --help)")
            raise ConfigError(f"{source}: unknown key '{key}'.{hint}")
        where = f"--{key}" if cli else f"{source}: '{key}'"
        if cli and isinstance(value, list) and not _takes_list(spec.type):
            raise ConfigError(f"{where} is given {len(value)} times; it takes one value")
        value = check_value(where, value, spec.type, cli)
        allowed = spec.metadata.get("choices") if spec.metadata else None
        if allowed is not None and value not in allowed:
            shown = ", ".join(json.dumps(c) for c in allowed)
            hint = closest(str(value), [str(c) for c in allowed if c is not None])
            raise ConfigError(f"{where} must be one of {shown}, got {json.dumps(value)}.{hint}")
        values[key] = value
    return values


def _takes_list(annotation: Any) -> bool:
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return any(typing.get_origin(option) in (list, tuple) for option in (annotation, *options))


def parse_settings(
    argv: list[str], fields: dict[str, dataclasses.Field], file_flag: str, prog: str, require_file: bool = False
) -> tuple[dict[str, Any], str]:
    """argv -> (checked values, the settings file's name or "command line")."""
    settings_file, overrides = split_argv(argv, file_flag)
    if settings_file is None and require_file:
        raise ConfigError(f"missing --{file_flag} (a JSON file, e.g. under config/); see {prog} --help")
    from_file = read_json_object(settings_file, file_flag) if settings_file else {}
    source = settings_file or "command line"
    return check_settings(fields, from_file, overrides, source, prog), source


def usage(prog: str, doc: str, file_flag: str, fields: dict[str, dataclasses.Field], more: str = "") -> str:
    """The `--help` text: the script's docstring, then each key with its help and default."""
    lines = [doc.strip(), "", f"Settings: --{file_flag} FILE.json and/or --key value (the command line wins)."]
    for name, spec in fields.items():
        default = spec.default if spec.default is not dataclasses.MISSING else None
        text = (spec.metadata or {}).get("help", "")
        lines.append(f"  --{name:<28} {text} [{json.dumps(default, default=str)}]")
    if more:
        lines += ["", more]
    return "\n".join(lines)


DEBUG_FLAG = "--debug"


def run_cli(main: Callable[[list[str]], Any], argv: list[str], help_text: Callable[[], str]) -> None:
    """An entry point's `__main__`: `--help` prints the key list; a user-facing error (bad settings, bad data,
    a full disk, a signal) is one line on stderr and its exit code; `--debug` shows the traceback instead."""
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        main(argv)
    except HelpRequested:
        print(help_text())
    except UserFacingError as error:
        if debug:
            raise
        print(f"{error.label}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except OSError as error:
        if debug or error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"disk full: {error}", file=sys.stderr)  # outside a checkpoint save (those say more)
        sys.exit(EXIT_IO)
    except KeyboardInterrupt:  # a Ctrl-C outside training (training saves first: train.guards)
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
