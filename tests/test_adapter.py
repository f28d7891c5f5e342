"""Our adapter file: round trip, layout and fingerprint checks, corrupt files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lora


class Tiny(nn.Module):
    def __init__(self, r=2, alpha=4, max_positions=4096, slices=(True, False, True)):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", hidden_size=8, max_position_embeddings=max_positions)
        self.qkv = lora.MergedLinear(8, 24, r=r, lora_alpha=alpha, enable_lora=slices, merge_weights=False)
        self.out = lora.Linear(24, 8, r=r, lora_alpha=alpha, merge_weights=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.out(self.qkv(x)))


def trained(seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny(**kw)
    with torch.no_grad():
        for p in lora.lora_state_dict(model).values():
            p.normal_()
    return model


def test_round_trip_is_exact_and_holds_only_adapters(tmp_path):
    model = trained()
    lora.save_adapter(model, tmp_path / "a.safetensors")
    fresh = trained(seed=0)
    with torch.no_grad():
        for p in lora.lora_state_dict(fresh).values():
            p.zero_()
    lora.load_adapter(fresh, tmp_path / "a.safetensors")
    for key, value in lora.lora_state_dict(model).items():
        assert torch.equal(fresh.state_dict()[key], value)
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["out.lora_A", "out.lora_B", "qkv.lora_A", "qkv.lora_B"]
        meta = f.metadata()
    assert meta["format"] == "lora-adapter" and meta["format_version"] == "1"
    layers = json.loads(meta["layers"])
    assert layers["qkv"] == {"class": "MergedLinear", "r": 2, "lora_alpha": 4, "use_rslora": False,
                             "use_dora": False, "lora_dropout": 0.0, "split_sizes": [8, 8, 8],
                             "enable_lora": [True, False, True]}
    fingerprint = json.loads(meta["fingerprint"])
    assert fingerprint["architecture"] == {"model_type": "toy", "hidden_size": 8, "max_position_embeddings": 4096,
                                           "rope_type": "default"}
    assert fingerprint["weights"]["out"] == [[8, 24], "float32"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_loading_into_an_eval_mode_model_reaches_the_output(tmp_path):
    model = trained()
    lora.save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = Tiny()  # the same base as trained(), adapters at their init
    fresh.eval()
    with lora.merged(fresh):
        lora.load_adapter(fresh, tmp_path / "a.safetensors")
        x = torch.randn(2, 8)
        torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(r=3), "tensor 'out.lora_A' has shape (2, 24), the model's is (3, 24)"),
        (dict(slices=(True, True, True)), "tensor 'qkv.lora_A' has shape (4, 8), the model's is (6, 8)"),
        (dict(alpha=8), "module 'out' was saved with lora_alpha=4, the model has lora_alpha=8"),
    ],
)
def test_layout_mismatch_names_the_first_difference_and_loads_nothing(tmp_path, other, message):
    lora.save_adapter(trained(), tmp_path / "a.safetensors")
    target = trained(seed=1, **other)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(lora.AdapterMismatchError) as info:
        lora.load_adapter(target, tmp_path / "a.safetensors")
    assert str(info.value) == f"{tmp_path / 'a.safetensors'}: {message}"
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_missing_and_extra_tensors(tmp_path):
    lora.save_adapter(trained(), tmp_path / "a.safetensors")
    model = trained()
    model.head = lora.Linear(8, 3, r=2)
    with pytest.raises(lora.AdapterMismatchError, match="the model's 'head.lora_A' is not in the file"):
        lora.load_adapter(model, tmp_path / "a.safetensors")
    model = trained()
    model.out = nn.Linear(24, 8)
    with pytest.raises(lora.AdapterMismatchError, match="tensor 'out.lora_A' has no place in the model"):
        lora.load_adapter(model, tmp_path / "a.safetensors")


def test_fingerprint_mismatch_with_equal_shapes_is_an_error_unless_overridden(tmp_path):
    source = trained()
    lora.save_adapter(source, tmp_path / "a.safetensors")
    long_context = trained(seed=1, max_positions=131072)
    with pytest.raises(lora.AdapterMismatchError) as info:
        lora.load_adapter(long_context, tmp_path / "a.safetensors")
    assert str(info.value) == (
        f"{tmp_path / 'a.safetensors'}: the adapter was trained on a different base model; differing fields: "
        "max_position_embeddings: file 4096, model 131072. Pass ignore_fingerprint=True to load it anyway")
    lora.load_adapter(long_context, tmp_path / "a.safetensors", ignore_fingerprint=True)
    assert torch.equal(long_context.out.lora_A, source.out.lora_A)


def test_base_dtype_is_part_of_the_fingerprint(tmp_path):
    lora.save_adapter(trained(), tmp_path / "a.safetensors")
    half = trained()
    half.out.weight.data = half.out.weight.data.bfloat16()
    expected = r"out: file \[\[8, 24\], 'float32'\], model \[\[8, 24\], 'bfloat16'\]"
    with pytest.raises(lora.AdapterMismatchError, match=expected):
        lora.load_adapter(half, tmp_path / "a.safetensors")


def test_corrupt_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(trained(), path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file \\(corrupt or truncated\\?\\)"):
        lora.load_adapter(trained(), tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lora.load_adapter(trained(), tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a lora adapter file \\(metadata format is None"):
        lora.load_adapter(trained(), tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="no such adapter file"):
        lora.load_adapter(trained(), tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, m: m.pop("layers"), "metadata lacks 'layers'"),
        (lambda t, m: m.pop("fingerprint"), "metadata lacks 'fingerprint'"),
        (lambda t, m: m.update(layers="{"), "metadata 'layers' is not valid JSON"),
        (lambda t, m: m.update(layers="[]"), "metadata 'layers' is not valid JSON"),
        (lambda t, m: m.update(layers=json.dumps({"out": [2]})),
         r"metadata 'layers': 'out' is list \[2\], expected an object"),
        (lambda t, m: m.update(fingerprint=json.dumps({"architecture": [], "weights": {}})),
         r"metadata 'fingerprint': 'architecture' is list \[\], expected an object"),
        (lambda t, m: m.update(fingerprint=json.dumps({"architecture": {}, "weights": "x"})),
         "metadata 'fingerprint': 'weights' is str 'x', expected an object"),
        (lambda t, m: t.update({"out.lora_A": t["out.lora_A"].long()}), "tensor 'out.lora_A' has dtype torch.int64"),
        (lambda t, m: t["out.lora_B"].view(-1).__setitem__(0, float("nan")), "tensor 'out.lora_B' holds NaN or inf"),
    ],
)
def test_adapter_files_with_bad_metadata_or_tensors(tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "a.safetensors"
    lora.save_adapter(trained(), path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)
    model = trained(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        lora.load_adapter(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_same_adapter_gives_the_same_bytes(tmp_path):
    # safetensors orders the metadata by a hash map's iteration, different from call to call
    paths = [tmp_path / f"{i}.safetensors" for i in range(8)]
    for path in paths:
        lora.save_adapter(trained(), path)
    assert len({path.read_bytes() for path in paths}) == 1
    model = trained(seed=1)
    lora.load_adapter(model, paths[0])
    assert all(torch.equal(a, b) for a, b in zip(lora.lora_state_dict(model).values(),
                                                 lora.lora_state_dict(trained()).values(), strict=True))
    with safe_open(paths[0], framework="pt") as f:
        assert f.metadata() == lora.adapter.adapter_metadata(trained())


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="the model has no LoRA layers with r > 0"):
        lora.save_adapter(nn.Linear(2, 2), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(trained(), path)
    before = path.read_bytes()
    import lora.adapter as adapter

    def broken(tensors, metadata, filename):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(trained(seed=5), path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*"))
