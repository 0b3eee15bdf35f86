"""The two attention modules of DANet: position attention (PAM) and channel attention (CAM).

Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019, Sections 3.2 (position
attention) and 3.3 (channel attention), by default as the authors' released code computes them.
Shapes: B batch, C channels, N = H * W positions, Cq = C / reduction the query/key width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from danet.config import CAM_ENERGIES, PAM_IMPLS

# Elements of one chunk of the attention matrix in the chunked kernel (16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v with the whole B x N x N map in memory. The reference implementation."""
    attention = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # B, N, N
    return attention @ v  # B, N, Cv


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same product through `scaled_dot_product_attention` with scale 1.

    The flash kernels (CUDA and CPU) want equal q/k/v widths, so v (width Cv) is cut into Cv / Cq
    slices of width Cq that become heads sharing one q and one k: exact, because every output
    column depends on the attention weights and its own value column only. Every fused kernel
    also wants unit stride along the width: PAM's v comes from a convolution as B x N x C with
    stride N along C, so the heads are copied contiguous (without that copy SDPA silently takes
    its math fallback, which builds Cv / Cq attention maps). docs/model.md, "Position attention kernels".
    """
    batch, positions, width = q.shape
    heads = v.shape[-1] // width
    # SDPA can share k and v among query heads (GQA), not q and k among value heads: copy them.
    q = q.unsqueeze(1).expand(batch, heads, positions, width).contiguous()
    k = k.unsqueeze(1).expand(batch, heads, positions, width).contiguous()
    v = v.reshape(batch, positions, heads, width).transpose(1, 2).contiguous()  # B, heads, N, Cq
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return out.transpose(1, 2).reshape(batch, positions, heads * width)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, else the input's own precision (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_rows(batch: int, positions: int) -> int:
    return max(1, min(positions, CHUNK_ELEMENTS // (batch * positions)))


def _block_view(buffer: torch.Tensor, batch: int, rows: int, positions: int) -> torch.Tensor:
    """A contiguous B x rows x N view at the start of a flat reusable buffer."""
    return buffer[: batch * rows * positions].view(batch, rows, positions)


class _ChunkedAttention(torch.autograd.Function):
    """Exact softmax(q k^T) v computed a block of query rows at a time (flash-style, in PyTorch).

    Forward keeps only the output and the row log-sum-exp; backward recomputes each block of the
    attention matrix from q, k and that log-sum-exp. Peak memory is two blocks instead of the
    N x N map, for about 4% more FLOPs than the explicit product (the recomputed q k^T). The
    blocks live in two reused buffers: allocating fresh ones per block costs page faults that
    take longer than the arithmetic on a CPU.

    Both passes compute in fp32 (fp64 for fp64 input) with autocast off: under autocast the
    products would otherwise run in bf16/fp16 in the forward only, and the backward, which
    recomputes the blocks, would differentiate a different function.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=q.device.type, enabled=False):
            return _ChunkedAttention._forward(ctx, q, k, v)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _ChunkedAttention._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        batch, positions, _ = q.shape
        rows = _chunk_rows(batch, positions)
        out = torch.empty(batch, positions, v.shape[-1], dtype=dtype, device=v.device)
        log_sum_exp = torch.empty(batch, positions, dtype=dtype, device=q.device)
        buffer = q.new_empty(batch * rows * positions)
        key_t = k.transpose(1, 2)
        for start in range(0, positions, rows):
            block = slice(start, start + rows)
            probs = _block_view(buffer, batch, q[:, block].shape[1], positions)
            torch.bmm(q[:, block], key_t, out=probs)  # scores, B x rows x N
            row_max = probs.amax(dim=-1, keepdim=True)
            row_sum = probs.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            out[:, block] = (probs @ v) / row_sum
            log_sum_exp[:, block] = (row_max + row_sum.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        return out

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, log_sum_exp = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        batch, positions, _ = q.shape
        rows = _chunk_rows(batch, positions)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # D_i = sum_c dO_ic O_ic, the softmax-backward term shared by a whole row
        row_dot = (grad_out * out).sum(-1)  # B, N
        probs_buffer, grad_buffer = q.new_empty(2, batch * rows * positions)
        key_t, value_t = k.transpose(1, 2), v.transpose(1, 2)
        for start in range(0, positions, rows):
            block = slice(start, start + rows)
            q_block, grad_out_block = q[:, block], grad_out[:, block]
            shape = (batch, q_block.shape[1], positions)
            probs = _block_view(probs_buffer, *shape)
            torch.baddbmm(-log_sum_exp[:, block, None], q_block, key_t, out=probs).exp_()
            grad_v.baddbmm_(probs.transpose(1, 2), grad_out_block)
            grad_scores = _block_view(grad_buffer, *shape)  # dS = P * (dP - D)
            torch.baddbmm(-row_dot[:, block, None], grad_out_block, value_t, out=grad_scores).mul_(probs)
            grad_q[:, block] = grad_scores @ k
            grad_k.baddbmm_(grad_scores.transpose(1, 2), q_block)
        return grad_q, grad_k, grad_v


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v by blocks of query rows, in fp32 even under autocast; output in v's dtype."""
    out = _ChunkedAttention.apply(q, k, v)
    return out.to(v.dtype)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The Triton kernel (danet/models/triton_attention.py): CUDA, or the CPU under TRITON_INTERPRET=1."""
    try:  # imported here, so installs without triton (CPU-only ones) never need it
        from danet.models.triton_attention import triton_attention as kernel
    except ImportError as error:
        if error.name != "triton":
            raise
        raise RuntimeError("impl='triton' needs the triton package (pip install triton) and a CUDA GPU; "
                           "use 'chunked' or 'explicit' without them") from error
    return kernel(q, k, v)


# The kernel behind impl="fused", per device type: the memory-saving one that measured best.
# CPU: chunked (SDPA recomputes q k^T once per value slice: slower, more memory; docs/benchmarks.md
# "Benchmarks"). CUDA: chunked until the training benchmark (`python -m danet.bench train --device
# cuda`) has measured sdpa (now on its fused kernels) and triton on a GPU; set it from that table.
FUSED_IMPL = {"cpu": "chunked", "cuda": "chunked"}


def fused_impl(device: torch.device) -> str:
    """The kernel impl="fused" runs on this device (chunked on device types not measured)."""
    return FUSED_IMPL.get(device.type, "chunked")


ATTENTION_FUNCTIONS = {"explicit": explicit_attention, "sdpa": sdpa_attention, "chunked": chunked_attention,
                       "triton": triton_attention}


class PositionAttention(nn.Module):
    """Position attention: every position is a weighted sum of the values of all positions.

    result = gamma * softmax(q k^T) v + x, no 1/sqrt(d) scaling, gamma a scalar starting at 0.

    Args:
        in_channels: C, the channels of the input and output.
        reduction: query/key width is C / reduction (8 in the released code, 1 as in the paper).
        impl: "explicit" builds the N x N map (the reference); "chunked", "sdpa" and "triton"
            (CUDA only) are exact memory-saving kernels; "fused" is FUSED_IMPL[device type] of the
            input, the kernel measured best on that kind of device.
    """

    def __init__(self, in_channels: int, reduction: int = 8, impl: str = "fused") -> None:
        super().__init__()
        if impl not in PAM_IMPLS:
            raise ValueError(f"impl must be one of {list(PAM_IMPLS)}, got {impl!r}")
        if reduction < 1 or in_channels % reduction:
            raise ValueError(
                f"reduction must be a positive divisor of in_channels={in_channels}, got {reduction!r}")
        query_channels = in_channels // reduction
        self.impl = impl
        self.query = nn.Conv2d(in_channels, query_channels, kernel_size=1)
        self.key = nn.Conv2d(in_channels, query_channels, kernel_size=1)
        self.value = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def _flat(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return conv(x).flatten(2).transpose(1, 2)  # B, N, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self._flat(self.query, x), self._flat(self.key, x), self._flat(self.value, x)
        impl = fused_impl(x.device) if self.impl == "fused" else self.impl
        out = ATTENTION_FUNCTIONS[impl](q, k, v)  # B, N, C
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return self.gamma * out + x

    @torch.no_grad()
    def attention_rows(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention weights of the chosen query positions (flat indices, shape P): B, P, N.

        Only these P rows are computed, so it is cheap for any input size.
        """
        q = self._flat(self.query, x)[:, positions]  # B, P, Cq
        k = self._flat(self.key, x)  # B, N, Cq
        return torch.softmax(q @ k.transpose(1, 2), dim=-1)


class ChannelAttention(nn.Module):
    """Channel attention: every channel is a weighted sum of all channels. No convolutions.

    energy = X X^T (C x C). energy="code" (released code): softmax(rowmax(E) - E), which equals
    softmax(-E) and so favours dissimilar channels; energy="paper": softmax(E). The result is
    beta * attention X + X with beta a scalar starting at 0 (named `gamma`, as in the code).
    Computed in fp32 (or fp64 for fp64 input) even under autocast: the energies are sums over N
    products.
    """

    def __init__(self, energy: str = "code") -> None:
        super().__init__()
        if energy not in CAM_ENERGIES:
            raise ValueError(f"energy must be one of {list(CAM_ENERGIES)}, got {energy!r}")
        self.energy = energy
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention_matrix(self, flat: torch.Tensor) -> torch.Tensor:
        """B, C, C attention from features flattened to B, C, N (fp32)."""
        energy = flat @ flat.transpose(1, 2)
        if self.energy == "code":
            energy = energy.amax(dim=-1, keepdim=True) - energy
        return torch.softmax(energy, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.to(dtype).flatten(2)  # B, C, N
            out = (self.attention_matrix(flat) @ flat).view(x.shape)
            return (self.gamma.to(dtype) * out + x.to(dtype)).to(x.dtype)
