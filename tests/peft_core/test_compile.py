"""torch.compile over adapted layers gives the eager outputs, gradients and training trajectory.

bench/sd_step.py times compiled variants; this is the test that the compiled path computes the same
thing. `aot_eager` traces our autograd Functions through dynamo and AOT autograd without generating
code (no compiler needed); `inductor` also generates C++ kernels and runs where a C++ compiler is
installed. fp32, small shapes, fresh random inputs each run.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core import LoraConfig, PacaConfig, PlpConfig, attach

BACKENDS = [
    "aot_eager",
    pytest.param(
        "inductor",
        marks=pytest.mark.skipif(
            shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler"
        ),
    ),
]
CONFIGS = {
    "lora": LoraConfig(targets=["up", "down"], r=4, alpha=8),
    "paca": PacaConfig(targets=["up", "down"], r=4, alpha=8),  # resident columns: the weight is written in place
    "plp": PlpConfig(targets=["up", "down"], r=4),
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def train(model: nn.Module, handle, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    handle.track_optimizer(optimizer)
    losses = []
    for x, y in zip(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def build(method: str, seed: int):
    """A block with nonzero adapters (so the adapter math matters from step one), the same for a seed."""
    torch.manual_seed(seed)
    model = Block()
    handle = attach(model, CONFIGS[method])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model, handle


def gradients(model: nn.Module, handle, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    (model(x) * upstream).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in handle.trainable_parameters()]
    for parameter in handle.trainable_parameters():
        parameter.grad = None
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_compiled_training_follows_eager_training(method, backend):
    torch._dynamo.reset()
    seed = int(torch.randint(0, 2**31, ()))
    eager, eager_handle = build(method, seed)
    compiled, compiled_handle = build(method, seed)
    compiled.compile(backend=backend)  # compiles __call__; compiled.forward stays the eager method

    x, upstream = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    for got, want in zip(
        gradients(compiled, compiled_handle, x, upstream), gradients(eager, eager_handle, x, upstream)
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    inputs, targets = [torch.randn(4, 16) for _ in range(4)], [torch.randn(4, 16) for _ in range(4)]
    torch.testing.assert_close(
        train(compiled, compiled_handle, inputs, targets),
        train(eager, eager_handle, inputs, targets),
        rtol=1e-4,
        atol=1e-6,
    )
    for got, want in zip(compiled_handle.trainable_parameters(), eager_handle.trainable_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # After training, the compiled model run eagerly (PaCA: resident columns rewritten from the
    # trained delta) equals the eager model.
    with torch.no_grad():
        probe = torch.randn(2, 16)
        torch.testing.assert_close(compiled.forward(probe), eager(probe), rtol=1e-4, atol=1e-5)
