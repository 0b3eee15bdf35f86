"""The Triton PAM kernel against the explicit one, on the CPU under Triton's interpreter.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when danet.models.triton_attention is
imported, so the comparison runs in a subprocess that sets it first (`python -m
tests.test_triton_attention`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import danet.models.attention as attention_module
from danet.models.attention import PositionAttention

REPO = Path(__file__).resolve().parent.parent


def _compare_with_explicit(batch: int, positions: int, qk_width: int, value_width: int) -> None:
    """Values and gradients of q, k and v (v channels-first, as PAM's convolution gives it)."""
    from danet.models.triton_attention import triton_attention

    torch.manual_seed(positions + value_width)
    q, k = (torch.randn(batch, positions, qk_width) for _ in range(2))
    v = torch.randn(batch, value_width, positions).transpose(1, 2)
    grad = torch.randn(batch, positions, value_width)
    results = []
    for kernel in (triton_attention, attention_module.explicit_attention):
        inputs = [tensor.clone().requires_grad_(True) for tensor in (q, k, v)]
        out = kernel(*inputs)
        out.backward(grad)
        results.append([out] + [tensor.grad for tensor in inputs])
    for name, candidate, expected in zip(("out", "grad q", "grad k", "grad v"), *results):
        torch.testing.assert_close(candidate, expected, atol=1e-5, rtol=1e-5, msg=lambda text, name=name: f"{name}: {text}")


def _interpreter_checks() -> None:
    import danet.models.triton_attention as triton_module

    # the kernel's default tiles: one ragged block of 64 rows and keys
    _compare_with_explicit(batch=2, positions=48, qk_width=16, value_width=64)
    # small tiles: the online softmax over 2 key blocks (ragged last), 3 value slices (ragged last)
    triton_module.BLOCK_M = triton_module.BLOCK_N = triton_module.BLOCK_V = 32
    _compare_with_explicit(batch=2, positions=48, qk_width=16, value_width=72)
    # wired into PAM: impl="triton" equals impl="explicit", gradients of every parameter included
    torch.manual_seed(6)
    reference = PositionAttention(64, 4, impl="explicit")
    torch.nn.init.constant_(reference.gamma, 0.7)
    candidate = PositionAttention(64, 4, impl="triton")
    candidate.load_state_dict(reference.state_dict())
    x = torch.randn(2, 64, 6, 7)
    grads = []
    for module in (candidate, reference):
        module(x).square().sum().backward()
        grads.append([p.grad for p in module.parameters()])
    torch.testing.assert_close(candidate(x), reference(x), atol=1e-5, rtol=1e-5)
    for candidate_grad, reference_grad in zip(*grads):
        torch.testing.assert_close(candidate_grad, reference_grad, atol=1e-4, rtol=1e-5)


@pytest.mark.slow  # a subprocess under the Triton interpreter: about 10 s
def test_triton_kernel_matches_explicit_in_values_and_gradients_under_the_interpreter():
    environment = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "tests.test_triton_attention"], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "triton kernel matches explicit"


def test_triton_impl_on_cpu_without_the_interpreter_says_what_to_use(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = PositionAttention(16, 8, impl="triton")
    torch.nn.init.constant_(module.gamma, 1.0)
    with pytest.raises(RuntimeError, match=r"impl='triton' runs on CUDA tensors \(got cpu\); on the CPU use 'chunked'"):
        module(torch.randn(1, 16, 3, 3))


def test_triton_impl_without_triton_installed_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    monkeypatch.delitem(sys.modules, "danet.models.triton_attention", raising=False)
    module = PositionAttention(16, 8, impl="triton")
    with pytest.raises(RuntimeError, match=r"impl='triton' needs the triton package"):
        module(torch.randn(1, 16, 3, 3))


if __name__ == "__main__":
    _interpreter_checks()
    print("triton kernel matches explicit")
