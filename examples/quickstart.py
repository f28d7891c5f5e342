"""loralib-style LoRA on a small model with Conv2d, Embedding and Linear layers (about 10 s on a CPU).

    python examples/quickstart.py

1. Pretrain a plain model on task A: find the row of a bright bar in an 8x8 image (8 classes).
2. Build the same model from `lora` layers (`import lora` where loralib's code has `import loralib as lora`),
   load the pretrained weights with `strict=False` (only lora_A / lora_B are missing), and
   `mark_only_lora_as_trainable`.
3. Fine-tune on task B: the label is `(row + token) % 8`, where a token 0-9 goes through the Embedding, so
   the adapters on the conv, the embedding and the linear layers must all learn something.
4. Save only the adapters (`lora_state_dict`), reload them into a fresh model, and export merged weights
   (`merged_state_dict`) that a plain model loads: all three give the same predictions.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import lora

CLASSES, TOKENS = 8, 10


class Net(nn.Module):
    """conv -> relu -> linear, plus an embedding of the token, -> relu -> linear head.

    `r=0` builds plain layers (the pretrained model); `r>0` the same layers with LoRA adapters.
    """

    def __init__(self, r: int = 0) -> None:
        super().__init__()
        conv, embedding, linear = (lora.Conv2d, lora.Embedding, lora.Linear) if r else (nn.Conv2d, nn.Embedding,
                                                                                         nn.Linear)
        adapter = {"r": r, "lora_alpha": 2 * r} if r else {}
        self.conv = conv(1, 16, 3, padding=1, **adapter)
        self.embed = embedding(TOKENS, 64, **adapter)
        self.fc = linear(16 * 8 * 8, 64, **adapter)
        self.head = nn.Linear(64, CLASSES)  # left frozen: the adapters upstream must do the work

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv(images)).flatten(1)  # (B, 16 * 8 * 8)
        return self.head(F.relu(self.fc(features) + self.embed(tokens)))


def batch(n: int, task: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images `(n, 1, 8, 8)` with a bar on a random row, tokens `(n,)`, labels for task A or B."""
    rows = torch.randint(0, CLASSES, (n,), generator=generator)
    tokens = torch.randint(0, TOKENS, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    images[torch.arange(n), 0, rows] += 1.0
    labels = rows if task == "A" else (rows + tokens) % CLASSES
    return images, tokens, labels


def train(model: nn.Module, task: str, steps: int, lr: float, seed: int) -> None:
    """AdamW on the parameters that require grad, fresh batches of 64 each step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        images, tokens, labels = batch(64, task, generator)
        loss = F.cross_entropy(model(images, tokens), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def accuracy(model: nn.Module, task: str) -> float:
    """Fraction of 2000 fixed held-out examples classified right."""
    images, tokens, labels = batch(2000, task, torch.Generator().manual_seed(99))
    return float((model(images, tokens).argmax(-1) == labels).float().mean())


def main() -> None:
    """Pretrain, adapt with LoRA, save/reload/merge, printing what each step gives."""
    start = time.perf_counter()
    torch.manual_seed(0)
    base = Net()
    train(base, "A", steps=100, lr=3e-3, seed=1)
    print(f"pretrained on A: accuracy A {accuracy(base, 'A'):.3f}, B {accuracy(base, 'B'):.3f}")

    model = Net(r=8)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in name for name in missing)
    lora.mark_only_lora_as_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA r=8 on conv, embedding, fc: {trainable:,} of {total:,} parameters train "
          f"({100 * trainable / total:.1f}%); accuracy B before {accuracy(model, 'B'):.3f}")
    train(model, "B", steps=250, lr=1e-2, seed=2)
    print(f"fine-tuned on B: accuracy B {accuracy(model, 'B'):.3f}")

    adapters = lora.lora_state_dict(model)  # only lora_A / lora_B: what you would torch.save
    fresh = Net(r=8)
    fresh.load_state_dict(base.state_dict(), strict=False)  # the pretrained checkpoint first
    fresh.load_state_dict(adapters, strict=False)  # then the adapters
    plain = Net()
    plain.load_state_dict(lora.merged_state_dict(model))  # W + (alpha / r) B A, no adapters needed
    images, tokens, _ = batch(256, "B", torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(images, tokens)
        torch.testing.assert_close(fresh(images, tokens), reference)
        torch.testing.assert_close(plain(images, tokens), reference, rtol=1e-4, atol=1e-4)
    size = sum(t.numel() for t in adapters.values())
    print(f"adapters reloaded and merged weights exported: same predictions ({size:,} adapter values saved); "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
