"""A training script's settings, each defined once: from one table come the defaults, the argument parser,
the config-file reader, the value checks and what a resumed run may change.

>>> table = Settings([Setting("learning_rate", 5e-6, "peak learning rate", bounds="positive"),
...                   Setting("r", 16, "LoRA rank", group="peft_config", flag="--lora-r", bounds="positive")])
>>> vars(table.parser("demo").parse_args(["--lora-r", "8"]))
{'r': 8}
>>> table.defaults("peft_config")
{'r': 16}

Every option also takes transformers' spelling (`--learning_rate`, `--lora_r`), so flags pasted from a Hugging
Face recipe work; abbreviations are refused (`--r 8` must not mean `--resume 8`). The parser suppresses
defaults: only what was given appears, so a config file or a checkpoint's settings fill in the rest.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lora.phi3.config import read_json

__all__ = ["Setting", "Settings"]

Bounds = Literal["positive", "non-negative", "fraction"]
_BOUND_TEXT = {"positive": "must be positive", "non-negative": "must be >= 0", "fraction": "must be in [0, 1)"}


@dataclass(frozen=True)
class Setting:
    """One setting: name, default, help, and what may be given for it.

    `default`'s type is the setting's type (`int`, `float`, `bool`, `str`; `None` for an optional string);
    `many` settings take a list of names or the default's one word (`target_modules`: `all-linear`).
    `resumable` settings may differ from the checkpoint's on `--resume`.
    """

    name: str
    default: Any
    help: str
    group: str = "training_config"
    choices: tuple[Any, ...] | None = None
    bounds: Bounds | None = None
    resumable: bool = False
    flag: str | None = None
    many: bool = False

    @property
    def option(self) -> str:
        """The command-line option: `--learning-rate` for `learning_rate`, unless `flag` names another."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def spellings(self) -> list[str]:
        """`option` and its transformers spelling (`--learning_rate`)."""
        return list(dict.fromkeys([self.option, "--" + self.option[2:].replace("-", "_")]))

    def checked_type(self, value: Any, source: str) -> Any:
        """`value` if it has this setting's type (an int is taken as a float); else a ValueError naming `source`."""
        default = self.default
        if self.many:
            ok = value == default or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            expected = f"a list of module names (or \"{default}\")"
            if isinstance(value, str) and not ok:
                expected += f"; write [\"{value}\"] for one name"
        elif default is None:
            ok, expected = value is None or isinstance(value, str), "a directory name (a string) or null"
        elif isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false (a boolean, not a string)"
        elif isinstance(default, int):
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            value = float(value) if ok else value
        else:
            ok, expected = isinstance(value, str), "a string"
        if not ok:
            raise ValueError(f"{source}: {self.name} must be {expected}, got {value!r} ({type(value).__name__})")
        return value

    def check_value(self, value: Any) -> None:
        """A ValueError naming the option unless `value` is within `bounds` and among `choices`."""
        inside = {"positive": lambda v: v > 0, "non-negative": lambda v: v >= 0, "fraction": lambda v: 0 <= v < 1}
        if self.bounds is not None and not inside[self.bounds](value):
            raise ValueError(f"{self.option} {_BOUND_TEXT[self.bounds]}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.option} must be one of {', '.join(map(str, self.choices))}, got {value!r}")


class Settings:
    """A table of `Setting`s, plus `fixed`: keys that recipe files may carry with the one value supported here
    (accepted with that value, then dropped)."""

    def __init__(self, settings: Iterable[Setting], *, fixed: dict[str, Any] | None = None) -> None:
        self.table = {s.name: s for s in settings}
        self.fixed = dict(fixed or {})

    def __getitem__(self, name: str) -> Setting:
        return self.table[name]

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.table.values())

    def defaults(self, group: str | None = None) -> dict[str, Any]:
        """`{name: default}` of every setting, or of those in `group`."""
        return {s.name: s.default for s in self if group is None or s.group == group}

    def parser(self, description: str, *, notes: dict[str, dict[str, Any]] | None = None) -> argparse.ArgumentParser:
        """An option per setting (`--no-x` for switches), grouped; `notes` adds `label: value` to a setting's help
        (say `{"embedded model": {"learning_rate": 3e-3}}`)."""
        parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                         allow_abbrev=False)
        groups: dict[str, Any] = {}  # group name: its argparse group
        for s in self:
            options = groups.get(s.group) or groups.setdefault(s.group, parser.add_argument_group(s.group))
            extra = "".join(f"; {label}: {values[s.name]}" for label, values in (notes or {}).items()
                            if s.name in values)
            text = f"{s.help} (default {s.default}{extra})"
            if isinstance(s.default, bool):
                options.add_argument(*s.spellings, dest=s.name, action=argparse.BooleanOptionalAction, help=text)
            elif s.many:
                options.add_argument(*s.spellings, dest=s.name, nargs="+", help=text)
            else:
                kind = type(s.default) if s.default is not None else str
                options.add_argument(*s.spellings, dest=s.name, type=kind, choices=s.choices, help=text)
        return parser

    def checked_types(self, values: dict[str, Any], source: str) -> dict[str, Any]:
        """`values` with every setting checked by `Setting.checked_type` and the `fixed` keys dropped; a
        ValueError naming `source` for an unknown key or a fixed key with another value."""
        unknown = sorted(set(values) - set(self.table) - set(self.fixed))
        if unknown:
            raise ValueError(f"{source}: unknown settings {unknown}; known: {', '.join(self.table)}")
        for key, value in self.fixed.items():
            if key in values and values[key] != value:
                raise ValueError(f"{source}: {key} can only be {value!r} here, got {values[key]!r}")
        return {k: self.table[k].checked_type(v, source) for k, v in values.items() if k in self.table}

    def read_file(self, path: str | Path) -> dict[str, Any]:
        """Settings from a JSON or TOML file: flat keys, or tables named after the groups (`[peft_config]`)."""
        file = Path(path)
        try:
            if file.suffix == ".toml":
                try:
                    import tomllib
                except ImportError as err:  # Python 3.10
                    raise ValueError(f"{file}: TOML needs Python 3.11 (tomllib); use a JSON file") from err
                data = tomllib.loads(file.read_text())
            else:
                data = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--config {file}: cannot read it ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"--config {file}: expected an object of settings")
        group_names = {s.group for s in self}
        flat = {k: v for k, v in data.items() if k not in group_names}
        for group in sorted(group_names & set(data)):
            if not isinstance(data[group], dict):
                raise ValueError(f"--config {file}: {group} must be a table of settings")
            flat.update(data[group])
        return self.checked_types(flat, f"--config {file}")

    def check_values(self, config: dict[str, Any]) -> None:
        """Every value within its setting's bounds and choices (`Setting.check_value`)."""
        for s in self:
            s.check_value(config[s.name])

    def resumed(self, checkpoint: Path, given: dict[str, Any]) -> dict[str, Any]:
        """The settings of a resumed run: the checkpoint's (its `train_config.json`), with those `given` now that
        may change (`resumable`); a ValueError for one given otherwise, or a file this table did not write."""
        path = checkpoint / "train_config.json"
        try:
            saved = read_json(path)
        except OSError as err:
            raise ValueError(f"--resume {path}: cannot read it ({err})") from err
        except ValueError as err:  # names the file
            raise ValueError(f"--resume {err}") from err
        if not isinstance(saved, dict) or set(saved) - set(self.fixed) != set(self.table):
            raise ValueError(f"--resume {path}: not the settings of a run of this script")
        saved = self.checked_types(saved, f"--resume {path}")
        changed = sorted(k for k, v in given.items() if not self.table[k].resumable and saved[k] != v)
        if changed:
            raise ValueError(f"--resume {checkpoint}: {', '.join(f'{k}={given[k]!r}' for k in changed)} "
                             f"contradict the checkpoint's settings "
                             f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); resuming keeps them")
        return {**saved, **given}
