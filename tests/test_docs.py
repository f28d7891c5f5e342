"""The Python examples in docs/phi3-lora.md run, in order, as one script."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_phi3_lora_doc_examples_run(tmp_path):
    text = (ROOT / "docs" / "phi3-lora.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if not b.startswith("patch(")]
    script = "\n".join(blocks)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    summary = re.search(r"```text\n(module.*?)```", text, flags=re.S).group(1)
    assert summary in result.stdout  # the summary shown in the doc is what the code prints
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "adapter-peft").is_dir()
    assert (tmp_path / "phi3-merged" / "config.json").exists()


def test_the_docstring_examples_in_lora_run():
    # every `>>>` example not marked `doctest: +SKIP`, in every module of the package
    import doctest
    import importlib
    import pkgutil

    import lora

    names = [m.name for m in pkgutil.walk_packages(lora.__path__, "lora.")]
    failed = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional extra (bitsandbytes, transformers) that this install lacks
            continue
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        if result.failed:
            failed[name] = result.failed
    assert not failed, failed
    assert len(names) > 20
