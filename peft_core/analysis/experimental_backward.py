"""EXPERIMENTAL, off by default, not exported: approximate attention backwards for low-rank heads.

The forward is always exact. Only the backward is approximated, in one of two ways (spec §2.4 (b)):

- `row_sampled`: the backward is linear in dO, so sample m query rows with probability
  p_i ∝ ||dO_i|| (with replacement), weight each by 1/(m p_i), and run the attention backward on
  those rows only (their softmax rows recomputed from q_i, K). dQ, dK and dV are unbiased; the cost
  is m/L of the exact backward's, paid for in variance (~1/m). Works with a causal mask.
- `nystrom`: for heads the regime report labels low-rank, P ≈ U1 V1^T with the Nyström factors of
  softmax(beta Q K^T) on m segment-mean landmarks; D_i = rowsum(dO ⊙ O) is exact; every product of
  §2.2 is thin (row-wise Kronecker of U1 with dO), O(L m d^2). Non-causal only (the mask breaks the
  low-rank structure), and only worth it when L >> m d.

Neither ships in the public API: the issue's bar is relative gradient error < 1e-2 *and* >= 1.3x
faster attention backward at a documented shape on a GPU, measured by bench/attn_backward.py, and
that benchmark has not been run yet. Use at your own risk:

    from peft_core.analysis.experimental_backward import approximate_attention
    out = approximate_attention(q, k, v, mode="row_sampled", samples=256)   # (B, H, L, d) tensors
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("exact", "row_sampled", "nystrom")


def approximate_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str = "exact",
    samples: int = 256,
    landmarks: int = 64,
    causal: bool = False,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """softmax(scale q k^T) v with an exact forward; the backward chosen by `mode`.

    q (B, H, Lq, d), k and v (B, H, Lk, d). samples: rows the row-sampled backward keeps;
    landmarks: the Nyström rank m. `mode="exact"` is plain SDPA.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mode == "exact":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if mode == "nystrom":
        if causal:
            raise ValueError("the Nyström backward needs non-causal attention (a causal mask is not low-rank)")
        return _NystromBackward.apply(q, k, v, scale, landmarks)
    return _RowSampledBackward.apply(q, k, v, scale, samples, causal, generator)


def _rows_backward(q_rows, k, v, o_rows, do_rows, scale, row_index, causal):
    """The exact attention backward restricted to some query rows.

    q_rows/o_rows/do_rows (N, R, d): R rows of N (batch*head) problems; k, v (N, L, d);
    row_index (N, R): their positions (for the causal mask). Returns dq_rows (N, R, d), dk, dv (N, L, d).
    """
    logits = scale * q_rows @ k.transpose(-1, -2)  # (N, R, L)
    if causal:
        keys = torch.arange(k.shape[1], device=k.device)
        logits = logits.masked_fill(keys[None, None, :] > row_index[..., None], -math.inf)
    p = torch.softmax(logits, dim=-1)
    dp = do_rows @ v.transpose(-1, -2)  # (N, R, L)
    delta = (do_rows * o_rows).sum(dim=-1, keepdim=True)  # D_i = rowsum(dO ⊙ O), exact
    ds = p * (dp - delta)  # (N, R, L)
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q_rows, p.transpose(-1, -2) @ do_rows


class _RowSampledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, samples, causal, generator):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale, ctx.samples, ctx.causal, ctx.generator = scale, samples, causal, generator
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        batch_shape, (length, dim) = q.shape[:-2], q.shape[-2:]
        q2, k2, v2 = q.reshape(-1, length, dim), k.reshape(-1, k.shape[-2], dim), v.reshape(-1, v.shape[-2], dim)
        o2, do2 = out.reshape(-1, length, dim), grad_out.reshape(-1, length, dim)
        m = min(ctx.samples, length)
        norms = do2.float().norm(dim=-1)  # (N, L)
        probabilities = norms / norms.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        rows = torch.multinomial(probabilities.cpu(), m, replacement=True, generator=ctx.generator).to(q.device)
        weights = 1.0 / (m * probabilities.gather(1, rows).clamp_min(1e-30))  # (N, m): unbiasing
        pick = rows[..., None].expand(-1, -1, dim)
        do_rows = do2.gather(1, pick) * weights[..., None].to(do2.dtype)
        dq_rows, dk, dv = _rows_backward(
            q2.gather(1, pick), k2, v2, o2.gather(1, pick), do_rows, ctx.scale, rows, ctx.causal
        )
        dq = torch.zeros_like(q2).scatter_add_(1, pick, dq_rows)  # a row sampled twice adds twice
        shape = (*batch_shape, -1, dim)
        return dq.reshape(q.shape), dk.reshape(shape), dv.reshape(shape), None, None, None, None


def nystrom_factors(
    q: torch.Tensor, k: torch.Tensor, scale: float, landmarks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U1, V1) with softmax(scale q k^T) ≈ U1 V1^T: q (N, L, d), k (N, Lk, d) -> (N, L, m), (N, Lk, m).

    Landmarks are segment means of q and k (Nyströmformer); U1 = softmax(q k~^T) pinv(softmax(q~ k~^T)),
    V1^T = softmax(q~ k^T).
    """
    m = min(landmarks, q.shape[1], k.shape[1])
    q_land = _segment_means(q, m)
    k_land = _segment_means(k, m)
    kernel_left = torch.softmax(scale * q @ k_land.transpose(-1, -2), dim=-1)  # (N, L, m)
    kernel_mid = torch.softmax(scale * q_land @ k_land.transpose(-1, -2), dim=-1)  # (N, m, m)
    kernel_right = torch.softmax(scale * q_land @ k.transpose(-1, -2), dim=-1)  # (N, m, Lk)
    return kernel_left @ torch.linalg.pinv(kernel_mid.float()).to(q.dtype), kernel_right.transpose(-1, -2)


def _segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    bounds = torch.linspace(0, x.shape[1], m + 1).round().long().tolist()
    return torch.stack([x[:, a:b].mean(dim=1) for a, b in zip(bounds, bounds[1:])], dim=1)


class _NystromBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, landmarks):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale, ctx.landmarks = scale, landmarks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        s = ctx.scale
        q2, k2, v2 = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
        o2, do2 = out.reshape(q2.shape), grad_out.reshape(q2.shape)
        U, V = nystrom_factors(q2, k2, s, ctx.landmarks)  # P ≈ U V^T
        delta = (do2 * o2).sum(dim=-1, keepdim=True)  # (N, L, 1)
        # dS = P ⊙ (dO V^T) - diag(D) P  ≈  (U ⊘ dO)(V ⊘ v)^T - diag(D) U V^T   (⊘: row-wise Kronecker)
        dv = V @ (U.transpose(-1, -2) @ do2)  # P^T dO
        t_k = torch.einsum("nja,njb,njc->nabc", V, v2, k2)  # (V ⊘ v)^T k: (N, m, d, d)
        dq = torch.einsum("nia,nib,nabc->nic", U, do2, t_k) - delta * (U @ (V.transpose(-1, -2) @ k2))
        t_q = torch.einsum("nia,nib,nic->nabc", U, do2, q2)  # (U ⊘ dO)^T q
        dk = torch.einsum("nja,njb,nabc->njc", V, v2, t_q) - V @ (U.transpose(-1, -2) @ (delta * q2))
        return (s * dq).reshape(q.shape), (s * dk).reshape(k.shape), dv.reshape(v.shape), None, None
