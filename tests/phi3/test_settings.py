"""lora.phi3.settings: one table, from which the parser, the file reader, the checks and the resume rule come."""

from __future__ import annotations

import json

import pytest

from lora.phi3.settings import Setting, Settings

TABLE = Settings([
    Setting("model", None, "a checkpoint"),
    Setting("learning_rate", 5e-6, "peak rate", bounds="positive"),
    Setting("warmup_ratio", 0.2, "warmup", bounds="fraction"),
    Setting("weight_decay", 0.0, "decay", bounds="non-negative"),
    Setting("steps", 10, "steps", resumable=True),
    Setting("packing", False, "pack rows"),
    Setting("dtype", "auto", "dtype", choices=("auto", "bfloat16")),
    Setting("r", 16, "rank", group="peft_config", flag="--lora-r"),
    Setting("target_modules", "all-linear", "targets", group="peft_config", many=True),
], fixed={"bias": "none"})


def test_defaults_and_groups():
    assert TABLE.defaults("peft_config") == {"r": 16, "target_modules": "all-linear"}
    assert set(TABLE.defaults()) == {s.name for s in TABLE}


def test_parser_gives_only_what_was_given_in_either_spelling():
    parser = TABLE.parser("demo", notes={"embedded model": {"learning_rate": 3e-3}})
    args = vars(parser.parse_args(["--learning_rate", "0.1", "--lora-r", "4", "--no-packing", "--target-modules",
                                   "q", "v"]))
    assert args == {"learning_rate": 0.1, "r": 4, "packing": False, "target_modules": ["q", "v"]}
    assert vars(parser.parse_args(["--lora_r", "2"])) == {"r": 2}
    help_text = parser.format_help()
    assert "(default 5e-06; embedded model: 0.003)" in help_text and "peft_config:" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--learning", "0.1"])  # no abbreviations
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float64"])


def test_file_reader_flat_or_grouped_with_type_checks(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 3, "learning_rate": 1, "peft_config": {"r": 2}, "bias": "none"}))
    assert TABLE.read_file(path) == {"steps": 3, "learning_rate": 1.0, "r": 2}  # an int is a number; bias dropped
    assert isinstance(TABLE.read_file(path)["learning_rate"], float)
    for text, message in [
        ({"steps": "3"}, "steps must be an integer, got '3' \\(str\\)"),
        ({"packing": "yes"}, "packing must be true or false \\(a boolean, not a string\\)"),
        ({"model": 3}, "model must be a directory name \\(a string\\) or null"),
        ({"target_modules": "q"}, 'target_modules must be a list of module names .*write \\["q"\\] for one name'),
        ({"bias": "all"}, "bias can only be 'none' here, got 'all'"),
        ({"stepz": 1}, "unknown settings \\['stepz'\\]; known: model, learning_rate"),
        ({"peft_config": [1]}, "peft_config must be a table of settings"),
        ([1], "expected an object of settings"),
    ]:
        path.write_text(json.dumps(text))
        with pytest.raises(ValueError, match=f"--config .*c.json: {message}"):
            TABLE.read_file(path)


def test_value_checks_name_the_option():
    config = TABLE.defaults()
    TABLE.check_values(config)
    for key, value, message in [("learning_rate", 0.0, "--learning-rate must be positive, got 0.0"),
                                ("warmup_ratio", 1.0, "--warmup-ratio must be in \\[0, 1\\), got 1.0"),
                                ("weight_decay", -1.0, "--weight-decay must be >= 0, got -1.0"),
                                ("dtype", "int8", "--dtype must be one of auto, bfloat16, got 'int8'")]:
        with pytest.raises(ValueError, match=message):
            TABLE.check_values({**config, key: value})


def test_resume_keeps_the_checkpoint_s_settings_but_the_resumable_ones(tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps({**TABLE.defaults(), "bias": "none"}))
    assert TABLE.resumed(tmp_path, {"steps": 20})["steps"] == 20
    with pytest.raises(ValueError, match="learning_rate=0.5 contradict the checkpoint's settings "
                                         "\\(learning_rate=5e-06\\); resuming keeps them"):
        TABLE.resumed(tmp_path, {"learning_rate": 0.5})
    (tmp_path / "train_config.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(ValueError, match="train_config.json: not the settings of a run of this script"):
        TABLE.resumed(tmp_path, {})
    (tmp_path / "train_config.json").write_text("{")
    with pytest.raises(ValueError, match="train_config.json: not valid JSON"):
        TABLE.resumed(tmp_path, {})
