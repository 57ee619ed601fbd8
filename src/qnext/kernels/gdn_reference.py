"""Gated DeltaNet (gated delta rule) in plain PyTorch: the references the fla kernels are checked against.

Per value head, with state S (K x V), decay d_t = exp(g_t), write strength beta_t:

    S_t = d_t S_{t-1} + beta_t k_t (v_t - d_t S_{t-1}^T k_t)^T,      o_t = scale * S_t^T q_t

``gdn_recurrent`` runs that token by token (the definition; small shapes only). ``gdn_chunked`` is
the same function chunk by chunk: inside a chunk, with Gamma_i = exp(sum of g up to i) and the
per-token update u_i = beta_i (v_i - d_i S_{i-1}^T k_i),

    (I + L) U = diag(beta) V - diag(beta Gamma) K S_0,    L_ij = beta_i (Gamma_i / Gamma_j) k_i.k_j  (j < i)
    O = scale * (diag(Gamma) Q S_0 + (M * Q K^T) U),     M_ij = Gamma_i / Gamma_j  (j <= i)
    S_C = Gamma_C S_0 + (K * Gamma_C / Gamma)^T U

so it needs one unit-lower-triangular solve per chunk and is fast enough in float32 on a GPU at
T = 8192 with autograd for the gradients. Layouts follow fla: q, k [B, T, H, K]; v [B, T, HV, V];
g, beta [B, T, HV]; value head h reads key head h // (HV // H). With ``cu_seqlens`` (B == 1) each
packed sequence starts from a zero state.
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (fla's use_qk_l2norm_in_kernel)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _segments(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError("cu_seqlens needs batch size 1 (packed sequences)")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
    return [(0, s, e) for s, e in zip(cu, cu[1:]) if e > s]


def _prepare(q, k, use_qk_l2norm: bool, HV: int):
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    rep = HV // q.shape[2]
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    return q, k


def _assemble(pieces: dict[int, list[torch.Tensor]], B: int) -> torch.Tensor:
    return torch.stack([torch.cat(pieces[b], dim=0) for b in range(B)], dim=0)


def gdn_recurrent(q, k, v, g, beta, scale: float | None = None, use_qk_l2norm: bool = False,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Token-by-token definition. Returns o [B, T, HV, V] in the inputs' dtype."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    q, k = _prepare(q, k, use_qk_l2norm, HV)
    pieces: dict[int, list[torch.Tensor]] = {b: [] for b in range(B)}
    for b, s, e in _segments(B, T, cu_seqlens):
        S = q.new_zeros(HV, K, V)
        outs = []
        for t in range(s, e):
            S = S * g[b, t].exp()[:, None, None]
            u = beta[b, t][:, None] * (v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))
            S = S + k[b, t][:, :, None] * u[:, None, :]
            outs.append(scale * torch.einsum("hkv,hk->hv", S, q[b, t]))
        pieces[b].append(torch.stack(outs, 0))
    return _assemble(pieces, B)


def _chunked_segment(q, k, v, g, beta, scale: float, chunk: int) -> torch.Tensor:
    """One sequence, tensors [L, HV, D] -> o [L, HV, V]."""
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [HV, L, D]
    g, beta = g.transpose(0, 1), beta.transpose(0, 1)  # [HV, L]
    HV, L, K = k.shape
    S = k.new_zeros(HV, K, v.shape[-1])
    outs = []
    for c0 in range(0, L, chunk):
        qc, kc, vc = q[:, c0:c0 + chunk], k[:, c0:c0 + chunk], v[:, c0:c0 + chunk]
        gc, bc = g[:, c0:c0 + chunk], beta[:, c0:c0 + chunk]
        n = kc.shape[1]
        gam = gc.cumsum(-1)  # log Gamma_i
        incl = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
        strict = incl.tril(-1)
        # Gamma_i / Gamma_j for j <= i; the masked upper part never reaches exp() (it could overflow)
        decay = torch.where(incl, gam[:, :, None] - gam[:, None, :], float("-inf")).exp()
        Lmat = (bc[:, :, None] * (kc @ kc.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
        A = Lmat + torch.eye(n, dtype=k.dtype, device=k.device)
        u_v = torch.linalg.solve_triangular(A, bc[..., None] * vc, upper=False, unitriangular=True)
        w_k = torch.linalg.solve_triangular(A, (bc * gam.exp())[..., None] * kc, upper=False, unitriangular=True)
        U = u_v - w_k @ S
        o = (gam.exp()[..., None] * qc) @ S + ((qc @ kc.transpose(-1, -2)) * decay) @ U
        outs.append(scale * o)
        tail = (gam[:, -1:] - gam).exp()  # Gamma_C / Gamma_j
        S = gam[:, -1].exp()[:, None, None] * S + (kc * tail[..., None]).transpose(-1, -2) @ U
    return torch.cat(outs, dim=1).transpose(0, 1)


def gdn_chunked(q, k, v, g, beta, scale: float | None = None, use_qk_l2norm: bool = False,
                cu_seqlens: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """Chunked form of :func:`gdn_recurrent` (same result up to rounding); differentiable."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    scale = K ** -0.5 if scale is None else scale
    q, k = _prepare(q, k, use_qk_l2norm, HV)
    pieces: dict[int, list[torch.Tensor]] = {b: [] for b in range(B)}
    for b, s, e in _segments(B, T, cu_seqlens):
        pieces[b].append(_chunked_segment(q[b, s:e], k[b, s:e], v[b, s:e], g[b, s:e], beta[b, s:e], scale, chunk))
    return _assemble(pieces, B)
