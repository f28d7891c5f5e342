"""Checkpoint directories: load, sharded round trip, transformers interop, atomic writes, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from phi3_tiny import TINY, longrope
from safetensors.torch import load_file, save_file

import lora.phi3.checkpoint as checkpoint
from lora.phi3 import from_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_sharded_round_trip_is_exact_and_transformers_loads_it(hf_checkpoint, tmp_path: Path) -> None:
    hf, path = hf_checkpoint(num_key_value_heads=2)
    model = from_pretrained(path)
    out = tmp_path / "ours"
    save_pretrained(model, out, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _state(model).values())
    again = from_pretrained(out)
    for name, tensor in _state(model).items():
        assert torch.equal(_state(again)[name], tensor), name
    theirs = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, hf(ids).logits)
        assert torch.equal(again(ids), model(ids))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == TINY["eos_token_id"]


def test_single_file_save_of_tied_model_omits_head(hf_checkpoint, tmp_path: Path) -> None:
    hf, path = hf_checkpoint(tie_word_embeddings=True, partial_rotary_factor=0.5)
    model = from_pretrained(path)
    out = tmp_path / "tied"
    save_pretrained(model, out)
    assert not (out / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    theirs = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, hf(ids).logits)
    assert from_pretrained(out).lm_head.weight is not None


def test_bf16_loads_zero_copy_from_the_mapped_file(hf_checkpoint) -> None:
    hf, path = hf_checkpoint()
    hf.to(torch.bfloat16).save_pretrained(path)
    model = from_pretrained(path)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16 and model.config.dtype == "bfloat16"
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
    assert any(lo <= weight.data_ptr() < hi for lo, hi in ranges)
    # A private mapping: writing to a parameter leaves the file alone.
    before = (path / "model.safetensors").read_bytes()
    with torch.no_grad():
        weight.add_(1.0)
    assert (path / "model.safetensors").read_bytes() == before
    assert model.name_or_path == str(path)


def test_dtype_and_string_dtype_conversion(hf_checkpoint) -> None:
    hf, path = hf_checkpoint()
    model = from_pretrained(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = hf.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert from_pretrained(path, dtype=torch.float16, device="cpu").lm_head.weight.dtype == torch.float16


def test_save_into_existing_directory_keeps_other_files(hf_checkpoint, tmp_path: Path) -> None:
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    out = tmp_path / "existing"
    save_pretrained(model, out, max_shard_size=20_000)
    (out / "tokenizer.json").write_text("{}")
    save_pretrained(model, out)  # sharded -> single file: the old shards and index must go
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not list(tmp_path.glob(".existing.*"))
    for name, tensor in _state(from_pretrained(out)).items():
        assert torch.equal(tensor, _state(model)[name])


def test_failed_save_leaves_nothing(hf_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    calls = []

    def fail_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "new", max_shard_size=20_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- bad input: each error names the file or tensor and what was expected ---


@pytest.fixture
def tiny_dir(hf_checkpoint) -> Path:
    return hf_checkpoint(num_key_value_heads=2)[1]


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere: not a directory; expected a Hugging Face checkpoint"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json: config\.json not found"):
        from_pretrained(tmp_path)


def test_wrong_model_type(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'mistral', expected 'phi3'"):
        from_pretrained(tiny_dir)


def test_no_weights(tiny_dir: Path) -> None:
    (tiny_dir / "model.safetensors").unlink()
    message = r": neither model\.safetensors nor model\.safetensors\.index\.json found"
    with pytest.raises(FileNotFoundError, match=message):
        from_pretrained(tiny_dir)


def test_missing_shard(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    save_pretrained(from_pretrained(tiny_dir), out, max_shard_size=20_000)
    second = sorted(out.glob("model-*.safetensors"))[1]
    second.unlink()
    message = rf"{second.name}: shard listed in .*model\.safetensors\.index\.json is missing"
    with pytest.raises(FileNotFoundError, match=message):
        from_pretrained(out)


@pytest.mark.parametrize("stale", ["index", "single file"])
def test_a_directory_holding_both_layouts_loads_what_transformers_loads(hf_checkpoint, tmp_path: Path, stale) -> None:
    # transformers' save_pretrained leaves the other layout's files behind, and its from_pretrained prefers
    # model.safetensors: ours must load the same weights (and not fail on the stale index's missing shards).
    hf, _ = hf_checkpoint()
    out = tmp_path / "resaved"
    first, second = ("20KB", "5GB") if stale == "index" else ("5GB", "20KB")
    hf.save_pretrained(out, max_shard_size=first)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(2)
    hf.save_pretrained(out, max_shard_size=second)
    assert (out / "model.safetensors").is_file() and (out / "model.safetensors.index.json").is_file()
    theirs = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        assert torch.equal(from_pretrained(out)(ids), theirs(ids).logits)


def test_index_names_a_tensor_its_shard_lacks(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    save_pretrained(from_pretrained(tiny_dir), out, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"]["model.norm.weight"] = first
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    message = rf"{first}: tensor 'model\.norm\.weight' listed in the index is not in the file"
    with pytest.raises(ValueError, match=message):
        from_pretrained(out)


def test_missing_tensor(tiny_dir: Path) -> None:
    _rewrite(tiny_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    message = r"1 tensor\(s\) missing from the checkpoint: model\.layers\.1\.mlp\.down_proj\.weight"
    with pytest.raises(ValueError, match=message):
        from_pretrained(tiny_dir)


def test_unexpected_tensor(tiny_dir: Path) -> None:
    _rewrite(tiny_dir, lambda t: t.update({"model.layers.2.mlp.down_proj.weight": torch.zeros(2)}))
    message = r"1 unexpected tensor\(s\) in the checkpoint: model\.layers\.2\.mlp\.down_proj\.weight"
    with pytest.raises(ValueError, match=message):
        from_pretrained(tiny_dir)


def test_shape_mismatch(tiny_dir: Path) -> None:
    _rewrite(tiny_dir, lambda t: t.update({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(96, 32)}))
    message = (
        r"tensor 'model\.layers\.0\.self_attn\.qkv_proj\.weight' has shape \(96, 32\), "
        r"but config\.json implies \(64, 32\)"
    )
    with pytest.raises(ValueError, match=message):
        from_pretrained(tiny_dir)


def test_unsupported_stored_dtype(tiny_dir: Path) -> None:
    _rewrite(tiny_dir, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    message = r"tensor 'model\.norm\.weight' has dtype I32; supported: BF16, F16, F32"
    with pytest.raises(ValueError, match=message):
        from_pretrained(tiny_dir)


def test_unsupported_requested_dtype(tiny_dir: Path) -> None:
    message = r"dtype torch\.float64 is not supported; expected one of float32, float16, bfloat16"
    with pytest.raises(ValueError, match=message):
        from_pretrained(tiny_dir, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not supported"):
        from_pretrained(tiny_dir, dtype="fp8")


def test_bad_max_shard_size(tiny_dir: Path, tmp_path: Path) -> None:
    model = from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match=r"max_shard_size must be an int or a size like '5GB'"):
        save_pretrained(model, tmp_path / "x", max_shard_size="lots")
    assert checkpoint.parse_size("2GiB") == 2 * 2**30 and checkpoint.parse_size("5GB") == 5 * 10**9


def test_plan_shards_names_the_files_and_keeps_the_order(tmp_path: Path) -> None:
    sizes = {"a": 6, "b": 3, "c": 12, "d": 1}
    assert checkpoint.plan_shards(sizes, "1KB") == {"model.safetensors": ["a", "b", "c", "d"]}
    files = checkpoint.plan_shards(sizes, 10)
    assert files == {"model-00001-of-00003.safetensors": ["a", "b"], "model-00002-of-00003.safetensors": ["c"],
                     "model-00003-of-00003.safetensors": ["d"]}  # a tensor larger than the limit: a file of its own
    checkpoint.write_shard_index(tmp_path, files, sizes)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 22}, "weight_map": {
        "a": "model-00001-of-00003.safetensors", "b": "model-00001-of-00003.safetensors",
        "c": "model-00002-of-00003.safetensors", "d": "model-00003-of-00003.safetensors"}}
    checkpoint.write_shard_index(tmp_path / "none", {"model.safetensors": ["a"]}, {"a": 6})  # one file: no index
    assert not (tmp_path / "none").exists()


def test_copy_of_directory_loads(tiny_dir: Path, tmp_path: Path) -> None:
    # from_pretrained needs only the files, not the directory it was written to.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert from_pretrained(copy).name_or_path == str(copy)


def test_longrope_v4_su_config_loads_and_saves_for_transformers(hf_checkpoint, tmp_path: Path) -> None:
    # The Hub's April 2024 128k files: transformers-4 spelling with "su"; transformers 5 itself rejects them.
    hf, path = hf_checkpoint(**longrope(8, original=16, maximum=64))
    v5 = json.loads((path / "config.json").read_text())
    rope = v5.pop("rope_parameters")
    v4 = {**v5, "rope_theta": rope["rope_theta"], "torch_dtype": v5.pop("dtype")}
    v4["rope_scaling"] = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    (path / "config.json").write_text(json.dumps(v4))
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (1, 30))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    save_pretrained(model, tmp_path / "v5")
    theirs = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "v5").eval()
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, hf(ids).logits)


def test_truncated_file(tiny_dir: Path) -> None:
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tiny_dir / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        from_pretrained(tiny_dir)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", 7])
def test_index_pointing_outside_the_directory_is_refused(tiny_dir: Path, tmp_path: Path, shard) -> None:
    out = tmp_path / "sharded"
    save_pretrained(from_pretrained(tiny_dir), out, max_shard_size=20_000)
    first = sorted(out.glob("model-*.safetensors"))[0]
    (tmp_path / "outside.safetensors").write_bytes(first.read_bytes())  # a real file there: it must not be read
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json: tensor 'model\.norm\.weight' maps to .*not a file name in"):
        from_pretrained(out)


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "generation_config.json", "config.json"])
def test_malformed_json_names_the_file(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "sharded"
    save_pretrained(from_pretrained(tiny_dir), out, max_shard_size=20_000)
    (out / name).write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=rf"{re.escape(str(out / name))}: not valid JSON"):
        from_pretrained(out)
