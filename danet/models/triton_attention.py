"""PAM's softmax(q k^T) v as Triton kernels: flash-attention style, forward and backward.

Imported only when impl="triton" is used, so installs without triton never load it. Runs on
CUDA, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before this module
is imported; the tests do that in a subprocess).

PAM's query/key width Cq (64 at C = 512) is much smaller than its value width Cv (512). A
program keeps a BLOCK_M x BLOCK_V fp32 accumulator in registers, and Cv = 512 does not fit next
to the score tile, so the value width is tiled: the forward grid has Cv / BLOCK_V programs per
block of query rows, each recomputing the same q k^T tile and its exponentials for its own value
slice. That costs (Cv / BLOCK_V - 1) extra q k^T products (N^2 Cq each) next to the N^2 Cv of
p v: with BLOCK_V = 128, 1.33x the explicit forward's multiply-adds, against the 1.78x of
SDPA's Cq-wide heads, and half of their exponentials. A larger BLOCK_V recomputes less but
needs more registers per program (fewer programs in flight); it is the knob to tune on a GPU.

The backward (dS = P * (dP - D), D = rowsum(dO * O)) needs dP = dO v^T over the whole value
width, so it runs as three deterministic kernels rather than with atomics: dV per (key block,
value slice), dK per key block and dQ per query block, the latter two each accumulating dP over
the value slices. Every pass recomputes P from q, k and the saved row log-sum-exp; nothing of
size N x N is ever stored. Accumulation is fp32; fp32 inputs multiply in full fp32 precision
("ieee", as torch's default matmul), bf16/fp16 inputs on tensor cores. No 1/sqrt(d) scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes; to be tuned on a GPU (docs/benchmarks.md).
BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # key rows per loop step
BLOCK_V = 128  # value columns per program (forward and dV)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _forward_kernel(q, k, v, out, lse, sqb, sqn, sqc, skb, skn, skc, svb, svn, svc, sob, son, soc,
                    positions, qk_width, value_width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    batch = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    value_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    qk_cols = tl.arange(0, BLOCK_D)
    row_ok, value_ok, qk_ok = rows < positions, value_cols < value_width, qk_cols < qk_width
    q_tile = tl.load(q + batch * sqb + rows[:, None] * sqn + qk_cols[None, :] * sqc,
                     mask=row_ok[:, None] & qk_ok[None, :], other=0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for start in range(0, positions, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < positions
        k_tile = tl.load(k + batch * skb + keys[:, None] * skn + qk_cols[None, :] * skc,
                         mask=key_ok[:, None] & qk_ok[None, :], other=0.0)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION)
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))  # finite: every block has a valid key
        probs = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v_tile = tl.load(v + batch * svb + keys[:, None] * svn + value_cols[None, :] * svc,
                         mask=key_ok[:, None] & value_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile, input_precision=PRECISION)
        row_max = new_max
    result = acc / row_sum[:, None]
    tl.store(out + batch * sob + rows[:, None] * son + value_cols[None, :] * soc, result.to(out.dtype.element_ty),
             mask=row_ok[:, None] & value_ok[None, :])
    # every value slice computes the same log-sum-exp; the first one stores it
    tl.store(lse + batch * positions + rows, row_max + tl.log(row_sum), mask=row_ok & (tl.program_id(1) == 0))


@triton.jit
def _grad_value_kernel(q, k, grad_out, lse, grad_v, sqb, sqn, sqc, skb, skn, skc, sgb, sgn, sgc,
                       positions, qk_width, value_width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """dV[keys, slice] = sum over query rows of P^T dO[:, slice]."""
    batch = tl.program_id(2)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    value_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    qk_cols = tl.arange(0, BLOCK_D)
    key_ok, value_ok, qk_ok = keys < positions, value_cols < value_width, qk_cols < qk_width
    k_tile = tl.load(k + batch * skb + keys[:, None] * skn + qk_cols[None, :] * skc,
                     mask=key_ok[:, None] & qk_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for start in range(0, positions, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < positions
        q_tile = tl.load(q + batch * sqb + rows[:, None] * sqn + qk_cols[None, :] * sqc,
                         mask=row_ok[:, None] & qk_ok[None, :], other=0.0)
        row_lse = tl.load(lse + batch * positions + rows, mask=row_ok, other=0.0)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION)
        probs = tl.where(row_ok[:, None], tl.exp(scores - row_lse[:, None]), 0.0)
        grad_tile = tl.load(grad_out + batch * sgb + rows[:, None] * sgn + value_cols[None, :] * sgc,
                            mask=row_ok[:, None] & value_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(probs).to(grad_tile.dtype), grad_tile, input_precision=PRECISION)
    tl.store(grad_v + batch * positions * value_width + keys[:, None] * value_width + value_cols[None, :],
             acc.to(grad_v.dtype.element_ty), mask=key_ok[:, None] & value_ok[None, :])


@triton.jit
def _grad_scores(q_tile, k_tile, v, grad_out, row_lse, row_dot, rows, keys, row_ok, key_ok, batch,
                 svb, svn, svc, sgb, sgn, sgc, value_width, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """dS = P * (dO v^T - D) for one BLOCK_M x BLOCK_N tile, dO v^T summed over the value slices."""
    probs = tl.exp(tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) - row_lse[:, None])
    grad_probs = tl.zeros(probs.shape, tl.float32)
    for start in range(0, value_width, BLOCK_V):
        value_cols = start + tl.arange(0, BLOCK_V)
        value_ok = value_cols < value_width
        grad_tile = tl.load(grad_out + batch * sgb + rows[:, None] * sgn + value_cols[None, :] * sgc,
                            mask=row_ok[:, None] & value_ok[None, :], other=0.0)
        v_tile = tl.load(v + batch * svb + keys[:, None] * svn + value_cols[None, :] * svc,
                         mask=key_ok[:, None] & value_ok[None, :], other=0.0)
        grad_probs += tl.dot(grad_tile, tl.trans(v_tile), input_precision=PRECISION)
    return tl.where(row_ok[:, None] & key_ok[None, :], probs * (grad_probs - row_dot[:, None]), 0.0)


@triton.jit
def _grad_key_kernel(q, k, v, grad_out, lse, row_dot, grad_k, sqb, sqn, sqc, skb, skn, skc, svb, svn, svc,
                     sgb, sgn, sgc, positions, qk_width, value_width, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """dK[keys] = sum over query rows of dS^T q."""
    batch = tl.program_id(1)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    qk_cols = tl.arange(0, BLOCK_D)
    key_ok, qk_ok = keys < positions, qk_cols < qk_width
    k_tile = tl.load(k + batch * skb + keys[:, None] * skn + qk_cols[None, :] * skc,
                     mask=key_ok[:, None] & qk_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, positions, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < positions
        q_tile = tl.load(q + batch * sqb + rows[:, None] * sqn + qk_cols[None, :] * sqc,
                         mask=row_ok[:, None] & qk_ok[None, :], other=0.0)
        row_lse = tl.load(lse + batch * positions + rows, mask=row_ok, other=0.0)
        row_dot_tile = tl.load(row_dot + batch * positions + rows, mask=row_ok, other=0.0)
        grad_scores = _grad_scores(q_tile, k_tile, v, grad_out, row_lse, row_dot_tile, rows, keys, row_ok, key_ok,
                                   batch, svb, svn, svc, sgb, sgn, sgc, value_width, BLOCK_V, PRECISION)
        acc += tl.dot(tl.trans(grad_scores).to(q_tile.dtype), q_tile, input_precision=PRECISION)
    tl.store(grad_k + batch * positions * qk_width + keys[:, None] * qk_width + qk_cols[None, :],
             acc.to(grad_k.dtype.element_ty), mask=key_ok[:, None] & qk_ok[None, :])


@triton.jit
def _grad_query_kernel(q, k, v, grad_out, lse, row_dot, grad_q, sqb, sqn, sqc, skb, skn, skc, svb, svn, svc,
                       sgb, sgn, sgc, positions, qk_width, value_width, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """dQ[rows] = sum over keys of dS k."""
    batch = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    qk_cols = tl.arange(0, BLOCK_D)
    row_ok, qk_ok = rows < positions, qk_cols < qk_width
    q_tile = tl.load(q + batch * sqb + rows[:, None] * sqn + qk_cols[None, :] * sqc,
                     mask=row_ok[:, None] & qk_ok[None, :], other=0.0)
    row_lse = tl.load(lse + batch * positions + rows, mask=row_ok, other=0.0)
    row_dot_tile = tl.load(row_dot + batch * positions + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, positions, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < positions
        k_tile = tl.load(k + batch * skb + keys[:, None] * skn + qk_cols[None, :] * skc,
                         mask=key_ok[:, None] & qk_ok[None, :], other=0.0)
        grad_scores = _grad_scores(q_tile, k_tile, v, grad_out, row_lse, row_dot_tile, rows, keys, row_ok, key_ok,
                                   batch, svb, svn, svc, sgb, sgn, sgc, value_width, BLOCK_V, PRECISION)
        acc += tl.dot(grad_scores.to(k_tile.dtype), k_tile, input_precision=PRECISION)
    tl.store(grad_q + batch * positions * qk_width + rows[:, None] * qk_width + qk_cols[None, :],
             acc.to(grad_q.dtype.element_ty), mask=row_ok[:, None] & qk_ok[None, :])


def _launch_options(q: torch.Tensor, v: torch.Tensor) -> dict:
    return dict(positions=q.shape[1], qk_width=q.shape[2], value_width=v.shape[2], BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])),
                BLOCK_V=min(BLOCK_V, max(16, triton.next_power_of_2(v.shape[2]))),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, positions, _ = q.shape
        options = _launch_options(q, v)
        out = torch.empty(batch, positions, v.shape[2], dtype=v.dtype, device=v.device)
        lse = torch.empty(batch, positions, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(positions, BLOCK_M), triton.cdiv(v.shape[2], options["BLOCK_V"]), batch)
        _forward_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), **options)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype)
        batch, positions, _ = q.shape
        options = _launch_options(q, v)
        row_dot = (grad_out.float() * out.float()).sum(-1).contiguous()  # D, B x N
        grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        strides = (*q.stride(), *k.stride())
        value_grid = (triton.cdiv(positions, BLOCK_N), triton.cdiv(v.shape[2], options["BLOCK_V"]), batch)
        _grad_value_kernel[value_grid](q, k, grad_out, lse, grad_v, *strides, *grad_out.stride(), **options)
        _grad_key_kernel[(triton.cdiv(positions, BLOCK_N), batch)](
            q, k, v, grad_out, lse, row_dot, grad_k, *strides, *v.stride(), *grad_out.stride(), **options)
        _grad_query_kernel[(triton.cdiv(positions, BLOCK_M), batch)](
            q, k, v, grad_out, lse, row_dot, grad_q, *strides, *v.stride(), *grad_out.stride(), **options)
        return grad_q, grad_k, grad_v


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for B x N x Cq queries/keys and B x N x Cv values, output in v's dtype.

    Inputs are brought to one dtype (fp32, bf16 or fp16; autocast's bf16 stays bf16).
    """
    if q.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise RuntimeError(f"impl='triton' runs on CUDA tensors (got {q.device.type}); on the CPU use 'chunked', "
                           "or set TRITON_INTERPRET=1 before importing triton for its (slow) interpreter")
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"impl='triton' computes in {[str(d) for d in DTYPES]}, got {dtype}")
    return _TritonAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype))
