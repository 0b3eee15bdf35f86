import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import danet.models.attention as attention_module
from danet.models.attention import ChannelAttention, PositionAttention


def _copy_of(module: PositionAttention, impl: str) -> PositionAttention:
    other = copy.deepcopy(module)
    other.impl = impl
    return other


@pytest.mark.parametrize("shape, reduction", [
    ((2, 32, 7, 5), 8),     # non-square, odd sides
    ((1, 16, 9, 13), 8),
    ((3, 24, 4, 4), 8),
    ((2, 16, 6, 11), 1),    # the paper's unreduced query/key
    ((1, 64, 1, 3), 4),
])
@pytest.mark.parametrize("impl", ["fused", "chunked", "sdpa"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_memory_saving_pam_matches_explicit_in_values_and_gradients(shape, reduction, impl, dtype, tolerance,
                                                                     monkeypatch):
    # small blocks, so the chunked kernel runs several of them and a ragged last one
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 2 * shape[0] * shape[2] * shape[3] + 1)
    torch.manual_seed(0)
    reference = PositionAttention(shape[1], reduction, impl="explicit").to(dtype)
    torch.nn.init.constant_(reference.gamma, 0.7)
    candidate = _copy_of(reference, impl)
    x = torch.randn(shape, dtype=dtype)
    grad = torch.randn(shape, dtype=dtype)

    outputs, grads = [], []
    for module in (reference, candidate):
        inputs = x.clone().requires_grad_(True)
        out = module(inputs)
        out.backward(grad)
        outputs.append(out)
        grads.append([inputs.grad] + [p.grad for p in module.parameters()])

    torch.testing.assert_close(outputs[1], outputs[0], atol=tolerance, rtol=tolerance)
    for candidate_grad, reference_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(candidate_grad, reference_grad, atol=tolerance, rtol=tolerance)


def test_sdpa_gives_the_fused_kernel_a_layout_it_accepts():
    # PAM's v is channels-first (stride N along the width); fused kernels refuse that, and with
    # only the flash kernel allowed SDPA raises instead of silently taking its math fallback
    torch.manual_seed(5)
    reference = PositionAttention(32, 8, impl="explicit")
    torch.nn.init.constant_(reference.gamma, 0.5)
    x = torch.randn(2, 32, 5, 7)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        result = _copy_of(reference, "sdpa")(x)
    torch.testing.assert_close(result, reference(x), atol=1e-5, rtol=1e-5)


def test_fused_runs_the_kernel_chosen_for_the_input_device_type(monkeypatch):
    calls = []

    def recording(name):
        def kernel(q, k, v):
            calls.append(name)
            return attention_module.explicit_attention(q, k, v)
        return kernel

    monkeypatch.setattr(attention_module, "ATTENTION_FUNCTIONS",
                        {name: recording(name) for name in attention_module.ATTENTION_FUNCTIONS})
    monkeypatch.setitem(attention_module.FUSED_IMPL, "cpu", "sdpa")
    PositionAttention(16, 8, impl="fused")(torch.randn(1, 16, 3, 3))
    assert calls == ["sdpa"]


def test_chunked_kernel_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    q, k = (torch.randn(2, 11, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 11, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention_module.chunked_attention, (q, k, v))


@pytest.mark.parametrize("module", [PositionAttention(16, 8, "explicit"), PositionAttention(16, 8, "fused"),
                                    ChannelAttention("code"), ChannelAttention("paper")])
def test_zero_gamma_makes_attention_the_identity(module):
    x = torch.randn(2, 16, 5, 7)
    assert torch.equal(module(x), x)


def test_pam_attention_is_the_unscaled_softmax_of_query_key_products():
    torch.manual_seed(1)
    module = PositionAttention(16, reduction=4, impl="explicit")
    torch.nn.init.constant_(module.gamma, 1.0)
    x = torch.randn(1, 16, 3, 4)
    q = module.query(x).flatten(2)[0].T  # N, Cq
    k = module.key(x).flatten(2)[0].T
    v = module.value(x).flatten(2)[0].T  # N, C
    expected = torch.softmax(q @ k.T, dim=-1) @ v  # no 1/sqrt(d)
    torch.testing.assert_close(module(x) - x, expected.T.reshape(1, 16, 3, 4))
    rows = module.attention_rows(x, torch.tensor([0, 5, 11]))
    torch.testing.assert_close(rows[0], torch.softmax(q @ k.T, dim=-1)[[0, 5, 11]])


def _softmax_rows(matrix: torch.Tensor) -> torch.Tensor:
    shifted = matrix - matrix.max(dim=-1, keepdim=True).values
    return shifted.exp() / shifted.exp().sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("energy", ["code", "paper"])
def test_cam_energies_follow_their_formulas(energy):
    torch.manual_seed(2)
    module = ChannelAttention(energy)
    torch.nn.init.constant_(module.gamma, 0.3)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    flat = x.flatten(2)
    gram = flat @ flat.transpose(1, 2)
    if energy == "code":  # softmax(rowmax(E) - E) == softmax(-E)
        expected_attention = _softmax_rows(gram.amax(-1, keepdim=True) - gram)
        torch.testing.assert_close(expected_attention, _softmax_rows(-gram))
    else:
        expected_attention = _softmax_rows(gram)
    attention = module.attention_matrix(flat)
    torch.testing.assert_close(attention, expected_attention)
    torch.testing.assert_close(module(x), 0.3 * (expected_attention @ flat).view_as(x) + x)


def test_code_energy_favours_dissimilar_channels_and_paper_energy_similar_ones():
    # channel 0 and 1 alike, channel 2 their opposite: E[0, 2] is the smallest entry of row 0
    base = torch.randn(1, 1, 30)
    flat = torch.cat([base, base * 0.9, -base], dim=1)
    assert ChannelAttention("code").attention_matrix(flat)[0, 0].argmax() == 2
    assert ChannelAttention("paper").attention_matrix(flat)[0, 0].argmax() == 0


def test_cam_computes_in_float32_under_autocast():
    torch.manual_seed(3)
    module = ChannelAttention()
    torch.nn.init.constant_(module.gamma, 0.5)
    x = torch.randn(1, 8, 6, 6).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = module(x)
    flat = x.float().flatten(2)
    expected = (0.5 * (module.attention_matrix(flat) @ flat).view(x.shape) + x.float()).to(torch.bfloat16)
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, expected)


def test_bad_attention_arguments_name_the_argument_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"reduction must be a positive divisor of in_channels=12"):
        PositionAttention(12, reduction=8)
    with pytest.raises(ValueError, match=r"impl must be one of \['fused', 'explicit', 'chunked', 'sdpa', 'triton'\]"):
        PositionAttention(16, impl="flash")
    with pytest.raises(ValueError, match=r"energy must be one of \['code', 'paper'\]"):
        ChannelAttention("neg")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_kernel_computes_in_float32_under_autocast(dtype, monkeypatch):
    # several blocks, so the block loop runs under autocast too
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 2 * 2 * 40 + 1)
    torch.manual_seed(4)
    q, k = (torch.randn(2, 40, 8).to(dtype) for _ in range(2))
    v, grad = (torch.randn(2, 40, 32).to(dtype) for _ in range(2))
    inputs = [tensor.clone().requires_grad_(True) for tensor in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_module.chunked_attention(*inputs)
    out.backward(grad)

    reference_inputs = [tensor.float().requires_grad_(True) for tensor in (q, k, v)]
    reference = attention_module.explicit_attention(*reference_inputs)
    reference.backward(grad.float())
    assert out.dtype == dtype
    # bf16 products would be off by ~1e-2 here; fp32 ones agree to fp32 rounding, and for bf16
    # inputs up to one bf16 ulp from the final cast
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -7)
    torch.testing.assert_close(out, reference.to(dtype), **tolerance)
    for candidate, expected in zip(inputs, reference_inputs):
        assert candidate.grad.dtype == dtype
        torch.testing.assert_close(candidate.grad, expected.grad.to(dtype), **tolerance)
