"""RWKV-7's generalised delta rule (Peng et al., 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution"),
in PyTorch.

Per head, with state `S` of shape `[K, V]` (fla's layout: the transpose of the paper's `V x K` state):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T  =  (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T r_t

`w` is the log decay, one per key channel (`w <= 0`; RWKV-7 keeps it in `(-exp(-0.5), 0)`); `a` and `b` make the
rank-one transition: RWKV-7 passes `a = -kk`, `b = kk * iclr` (kk the L2-normalised removal key, iclr the in-context
learning rate in (0, 1)), which removes the fraction iclr of what the memory holds along kk before writing `k v^T`.
The read-out uses the new state, with `scale = 1` in RWKV-7 (the default here). In the paper's `V x K` convention
this is `S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T`, `o_t = S_t r_t` with `w_t = exp(w)`: the same numbers.
It is fla's DPLR (diagonal plus low rank) delta rule, which `fla.ops.rwkv7` runs with these argument names.

Forms (float32 math, float64 for float64 inputs), all with `[N, H, K, V]` initial/final states and `cu_seqlens`:

- `naive_recurrent_rwkv7`: token by token, the ground truth.
- `naive_chunk_rwkv7`: the chunked parallel form (below); differentiable, the CPU training / prefill path.
- `rwkv7_step`: one token (decode); `jetnas.ops.decode.rwkv7_step_` is its in-place form for the engine.

`chunk_rwkv7` / `fused_recurrent_rwkv7` have the same signatures and run fla's kernels on CUDA with
`backend="triton"`, the references otherwise.

Chunked form. Within a chunk of C tokens starting from `S_0`, let `G_i = sum_{m <= i} w_m` (inclusive, per key
channel) and `E_i = G_i - w_i` (exclusive). Unrolling the recurrence with `u_j = S_{j-1}^T a_j` (a V-vector),

    S_i = exp(G_i) * S_0 + sum_{j <= i} exp(G_i - G_j) * (b_j u_j^T + k_j v_j^T)          (`*` per key channel)
    u_i = (a_i exp(E_i))^T S_0 + sum_{j < i} A_ab[i, j] u_j + A_ak[i, j] v_j,
          A_xy[i, j] = sum_c x_i[c] y_j[c] exp(E_i[c] - G_j[c])

so `(I - A_ab) U = (A exp(E)) S_0 + A_ak V`, one unit-lower-triangular solve per chunk (split into a part
independent of `S_0`, solved for every chunk at once, and `W = (I - A_ab)^-1 (A exp(E))`, applied to each chunk's
`S_0` in turn). Outputs take the same shape with inclusive decays, `o = scale (r exp(G) S_0 + A_rb U + A_rk V)`, and
the next chunk starts from `S_C`. Every decay is formed pairwise (`exp(G_i - G_j)`, masked before the exponential),
never as a ratio of cumulative decays, so the form is exact for any decay strength.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetnas.ops import _fla
from jetnas.ops.backend import Backend, as_backend
from jetnas.ops.utils import check_cu_seqlens, check_state, compute_dtype


def _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens) -> tuple[int, int, int, int, int, int]:
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, K], got shape {list(r.shape)}")
    B, T, H, K = r.shape
    for name, t in (("w", w), ("k", k), ("a", a), ("b", b)):
        if t.shape != r.shape:
            raise ValueError(f"{name} must have the shape of r {list(r.shape)}, got {list(t.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    N = check_cu_seqlens(cu_seqlens, B, T)
    V = v.shape[-1]
    check_state(initial_state, (N, H, K, V), "initial_state")
    return B, T, H, K, V, N


def _segments(T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def rwkv7_step(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence (the decode step).

    Args:
        r, w, k, a, b: `[B, H, K]` (w: log decay).
        v: `[B, H, V]`.
        state: `[B, H, K, V]`, or None (zeros).
        scale: multiplies r (1 in RWKV-7).

    Returns:
        `(o [B, H, V] in v's dtype, new_state [B, H, K, V] float32, float64 for float64 inputs)`.
    """
    if r.dim() != 3 or any(t.shape != r.shape for t in (w, k, a, b)) or v.dim() != 3 or v.shape[:2] != r.shape[:2]:
        raise ValueError(f"expected r, w, k, a, b [B, H, K] and v [B, H, V], got {list(r.shape)}, {list(w.shape)}, "
                         f"{list(k.shape)}, {list(a.shape)}, {list(b.shape)}, {list(v.shape)}")
    B, H, K = r.shape
    V = v.shape[-1]
    check_state(state, (B, H, K, V), "state")
    dtype = compute_dtype(r, w, k, v, a, b, state)
    rf, wf, kf, vf, af, bf = (t.to(dtype) for t in (r, w, k, v, a, b))
    S = torch.zeros(B, H, K, V, dtype=dtype, device=r.device) if state is None else state.to(dtype)
    # what the memory returns for a, read before this token's decay (the transition acts on S_{t-1})
    sa = torch.einsum("bhk,bhkv->bhv", af, S)
    S = S * wf.exp()[..., None] + bf[..., :, None] * sa[..., None, :] + kf[..., :, None] * vf[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", rf * scale, S)
    return o.to(v.dtype), S


def naive_recurrent_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token RWKV-7 recurrence: the ground truth every other form is tested against.

    Args:
        r: `[B, T, H, K]` receptance (the query).
        w: `[B, T, H, K]` log decay (<= 0), per key channel.
        k: `[B, T, H, K]`; v: `[B, T, H, V]`.
        a, b: `[B, T, H, K]`, the rank-one transition `b a^T` (RWKV-7: `a = -kk`, `b = kk * iclr`).
        scale: multiplies r; 1 (RWKV-7's) by default.
        initial_state: `[N, H, K, V]`, N = B or the number of packed sequences; None for zeros.
        output_final_state: return the final `[N, H, K, V]` state (float32, float64 for float64 inputs).
        cu_seqlens: `[N + 1]` cumulative lengths of packed sequences (B must be 1); the state restarts at each.

    Returns:
        `(o [B, T, H, V] in v's dtype, final_state or None)`.
    """
    B, T, H, K, V, N = _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens)
    dtype = compute_dtype(r, w, k, v, a, b, initial_state)
    o = torch.empty_like(v)
    finals = []
    for n, (s, e) in enumerate(_segments(T, cu_seqlens)):
        # with packed sequences B == 1, so `x[:, t]` selects token t of sequence n either way
        S = None if initial_state is None else initial_state if cu_seqlens is None else initial_state[n : n + 1]
        for t in range(s, e):
            o[:, t], S = rwkv7_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], S, scale)
        if S is None:  # an empty sequence with no initial state
            S = torch.zeros(B if cu_seqlens is None else 1, H, K, V, dtype=dtype, device=r.device)
        finals.append(S.to(dtype))
    return o, (torch.cat(finals, 0) if output_final_state else None)


def _chunk_fixed_length(r, w, k, v, a, b, scale, S0, chunk_size):
    """The chunked form (module docstring) on equal-length sequences, inputs in the compute dtype.

    r, w, k, a, b: [B, T, H, K]; v: [B, T, H, V]; S0: [B, H, K, V]. Returns (o [B, T, H, V], S [B, H, K, V]).
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    C = chunk_size
    NC = -(-T // C)
    pad = NC * C - T
    if pad:
        # padded steps neither write (k = v = b = 0) nor decay (w = 0); their outputs are dropped
        r, w, k, v, a, b = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, w, k, v, a, b))

    def chunks(x):  # [B, T, H, ...] -> [B, H, NC, C, ...]
        return x.reshape(B, NC, C, H, *x.shape[3:]).movedim(3, 1)

    r, w, k, v, a, b = map(chunks, (r, w, k, v, a, b))
    G = w.cumsum(3)  # decay from the chunk start through token i
    E = G - w  # ... through token i - 1 (what u_i = S_{i-1}^T a_i sees)
    idx = torch.arange(C, device=r.device)
    upto = (idx[:, None] >= idx[None, :])[..., None]  # j <= i
    before = (idx[:, None] > idx[None, :])[..., None]  # j < i
    # pairwise decays [.., C, C, K], masked before exp so nothing above the diagonal can overflow
    read_decay = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~upto, float("-inf")).exp()
    transition_decay = (E[..., :, None, :] - G[..., None, :, :]).masked_fill(~before, float("-inf")).exp()

    def pairwise(x, y, decay):  # sum_c x_i[c] y_j[c] decay[i, j, c]
        return torch.einsum("...ic,...jc,...ijc->...ij", x, y, decay)

    A_ab, A_ak = pairwise(a, b, transition_decay), pairwise(a, k, transition_decay)
    A_rb, A_rk = pairwise(r, b, read_decay), pairwise(r, k, read_decay)
    tri = torch.eye(C, dtype=r.dtype, device=r.device) - A_ab
    # u = W S_0 + U_0 for each chunk's S_0
    W = torch.linalg.solve_triangular(tri, a * E.exp(), upper=False, unitriangular=True)
    U0 = torch.linalg.solve_triangular(tri, A_ak @ v, upper=False, unitriangular=True)
    r_decayed = r * G.exp()  # reads the chunk's initial state
    b_to_end = b * (G[..., -1:, :] - G).exp()  # writes carried to the chunk's end
    k_to_end = k * (G[..., -1:, :] - G).exp()
    chunk_decay = G[..., -1, :].exp()[..., None]  # [B, H, NC, K, 1]

    S = S0
    out = []
    for c in range(NC):
        u = W[:, :, c] @ S + U0[:, :, c]  # [B, H, C, V]
        out.append(scale * (r_decayed[:, :, c] @ S + A_rb[:, :, c] @ u + A_rk[:, :, c] @ v[:, :, c]))
        S = (chunk_decay[:, :, c] * S + b_to_end[:, :, c].transpose(-1, -2) @ u
             + k_to_end[:, :, c].transpose(-1, -2) @ v[:, :, c])
    o = torch.stack(out, 2).movedim(1, 3).reshape(B, NC * C, H, V)[:, :T]
    return o, S


def naive_chunk_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked RWKV-7 recurrence (module docstring), same contract as `naive_recurrent_rwkv7`; differentiable
    (autograd through `solve_triangular`). Only the chunk-to-chunk state update is sequential. `chunk_size` is 16 by
    default because the pairwise decays are `C * C * K` numbers per chunk (fla's kernels use 16 too)."""
    B, T, H, K, V, N = _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = compute_dtype(r, w, k, v, a, b, initial_state)
    ins = [t.to(dtype) for t in (r, w, k, v, a, b)]
    outs, finals = [], []
    for n, (s, e) in enumerate(_segments(T, cu_seqlens)):
        rows = B if cu_seqlens is None else 1
        if initial_state is None:
            S0 = torch.zeros(rows, H, K, V, dtype=dtype, device=r.device)
        else:
            S0 = (initial_state if cu_seqlens is None else initial_state[n : n + 1]).to(dtype)
        if e == s:
            finals.append(S0)
            continue
        o_n, S = _chunk_fixed_length(*(t[:, s:e] for t in ins), scale, S0, chunk_size)
        outs.append(o_n)
        finals.append(S)
    o = torch.cat(outs, 1) if outs else ins[3][:, :0]
    return o.to(v.dtype), (torch.cat(finals, 0) if output_final_state else None)


def chunk_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked RWKV-7 recurrence (training, prefill): fla's `chunk_rwkv7` on CUDA with `backend="triton"`, the
    PyTorch reference otherwise. Arguments and returns as in `naive_recurrent_rwkv7`; the final state is float32."""
    _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens)
    if as_backend(backend).runs_fla(r):
        return _fla.chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)
    return naive_chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token RWKV-7 recurrence (decode): fla's `fused_recurrent_rwkv7` on CUDA with `backend="triton"`
    (forward only in fla: under autograd the adapter runs fla's chunked kernel, the same function), the reference
    recurrence otherwise. Arguments and returns as in `naive_recurrent_rwkv7`."""
    _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens)
    if as_backend(backend).runs_fla(r):
        return _fla.fused_recurrent_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)
    return naive_recurrent_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)
