"""The gated delta rule (Gated DeltaNet; the recurrence inside the JetBlock), in PyTorch.

Per head, with state `S` of shape `[K, V]`:

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

`g` is the log-space decay (`g <= 0`; `None` means no decay, i.e. the plain delta rule) and `beta` the write
strength (`None` means 1). Three readable forms live here, all computing in float32 (float64 if given float64):

- `naive_recurrent_gated_delta_rule`: token by token; the ground truth.
- `naive_chunk_gated_delta_rule`: the chunked parallel form (WY representation, see README.md beside this file);
  differentiable, used for training and prefill on CPU.
- `gated_delta_rule_step`: one token, the decode step.

`chunk_gated_delta_rule` / `fused_recurrent_gated_delta_rule` have the same signatures and run
flash-linear-attention's Triton kernels on CUDA when the backend is "triton", the references otherwise.
"""

from __future__ import annotations

import torch

from jetnas.ops import _fla
from jetnas.ops.backend import Backend, as_backend
from jetnas.ops.utils import check_cu_seqlens, check_state, compute_dtype, l2norm


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {list(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {list(q.shape)}, got {list(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t is not None and tuple(t.shape) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {list(t.shape)}")
    N = check_cu_seqlens(cu_seqlens, B, T)
    V = v.shape[-1]
    check_state(initial_state, (N, H, K, V), "initial_state")
    return B, T, H, K, V, N


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    state: torch.Tensor | None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the gated delta rule (the decode step).

    Args:
        q, k: `[B, H, K]`.
        v: `[B, H, V]`.
        g: `[B, H]` log decay, or None (no decay).
        beta: `[B, H]`, or None (beta = 1).
        state: `[B, H, K, V]`, or None (zeros).
        scale: defaults to `K ** -0.5`.
        use_qk_l2norm: L2-normalise q and k first.

    Returns:
        `(o [B, H, V] in v's dtype, new_state [B, H, K, V] in float32, or float64 for float64 inputs)`.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, H, K] and v [B, H, V], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, H, K = q.shape
    V = v.shape[-1]
    check_state(state, (B, H, K, V), "state")
    dtype = compute_dtype(q, k, v, state)
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    S = torch.zeros(B, H, K, V, dtype=dtype, device=q.device) if state is None else state.to(dtype)
    if g is not None:
        S = S * g.to(dtype).exp()[..., None, None]
    # the delta: what the memory should store for k minus what it returns for k
    delta = vf - torch.einsum("bhk,bhkv->bhv", kf, S)
    if beta is not None:
        delta = delta * beta.to(dtype)[..., None]
    S = S + kf[..., :, None] * delta[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", qf * scale, S)
    return o.to(v.dtype), S


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule: the ground truth every other form is tested against.

    Args:
        q, k: `[B, T, H, K]`.
        v: `[B, T, H, V]`.
        g: `[B, T, H]` log decay (<= 0), or None for the ungated delta rule.
        beta: `[B, T, H]` write strength in (0, 1], or None for 1.
        scale: query scale; defaults to `K ** -0.5`.
        initial_state: `[N, H, K, V]`, N = B, or the number of packed sequences.
        output_final_state: return the final state `[N, H, K, V]` (float32, float64 for float64 inputs).
        cu_seqlens: `[N + 1]` cumulative lengths of packed sequences (B must be 1); the state restarts at each.
        use_qk_l2norm: L2-normalise q and k per head first.

    Returns:
        `(o [B, T, H, V] in v's dtype, final_state or None)`.
    """
    B, T, H, K, V, N = _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    segments = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    o = torch.empty_like(v)
    finals = []
    for n, (s, e) in enumerate(segments):
        # with packed sequences B == 1, so `x[:, t]` selects token t of sequence n either way
        S = None if initial_state is None else initial_state[n : n + 1] if cu_seqlens is not None else initial_state
        for t in range(s, e):
            o[:, t], S = gated_delta_rule_step(
                q[:, t], k[:, t], v[:, t],
                None if g is None else g[:, t],
                None if beta is None else beta[:, t],
                S, scale, use_qk_l2norm,
            )
        if S is None:  # an empty sequence with no initial state
            S = torch.zeros(B if cu_seqlens is None else 1, H, K, V, dtype=compute_dtype(q), device=q.device)
        finals.append(S.to(compute_dtype(q, k, v, initial_state)))
    return o, (torch.cat(finals, 0) if output_final_state else None)


def _chunk_local(q, k, v, g, beta, chunk_size):
    """The chunk-local parts of the chunked form (no state involved); inputs already in the compute dtype.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]. T is padded to whole chunks: padded steps write nothing
    (k = v = beta = 0) and do not decay (g = 0), so they carry the state unchanged; their outputs are dropped.

    Returns a dict of `[B, H, NC, C, ...]` tensors: `U` and `W` (the WY form: a chunk's new values are
    `U - W @ S` for the state `S` at the chunk's start), `attn` (the causal intra-chunk scores with decay),
    `q_decayed` (queries reading the chunk's initial state), `k_to_end` (writes carried to the chunk's end) and
    `chunk_decay` `[B, H, NC]` (the state's decay over the whole chunk).
    """
    B, T, H, _ = q.shape
    C = chunk_size
    NC = -(-T // C)
    pad = NC * C - T
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (g, beta))

    def chunks(x):  # [B, T, H, ...] -> [B, H, NC, C, ...]
        x = x.reshape(B, NC, C, H, *x.shape[3:])
        return x.movedim(3, 1)

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    G = g.cumsum(-1)  # [B, H, NC, C] decay from the chunk start through position i
    idx = torch.arange(C, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    # exp(G_i - G_j) for j <= i, and 0 above the diagonal (masked before exp so nothing overflows)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    # u = (I + A)^-1 (beta v - beta exp(G) k S0) with A_ij = beta_i (k_i . k_j) exp(G_i - G_j), j < i
    strictly_lower = idx[:, None] > idx[None, :]
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strictly_lower, 0.0)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    tri = eye + A
    U = torch.linalg.solve_triangular(tri, beta[..., None] * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(tri, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    return {
        "U": U,
        "W": W,
        "attn": (q @ k.transpose(-1, -2)) * decay,  # causal, diagonal included
        "q_decayed": q * G.exp()[..., None],
        "k_to_end": k * (G[..., -1:] - G).exp()[..., None],
        "chunk_decay": G[..., -1].exp(),
    }


def chunk_state_pass(
    U: torch.Tensor, W: torch.Tensor, k_to_end: torch.Tensor, chunk_decay: torch.Tensor, S0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential inter-chunk state pass of the chunked form (the only sequential part), in PyTorch.

    Per chunk c: `v_new_c = U_c - W_c @ S_c` and `S_{c+1} = chunk_decay_c * S_c + k_to_end_c^T @ v_new_c`, affine in
    `S`. The segment-parallel pass (`jetnas.ops.segment_pass`) calls it on segments of the chunks.

    Args:
        U: `[N, H, NC, C, V]`; W, k_to_end: `[N, H, NC, C, K]`; chunk_decay: `[N, H, NC]`; S0: `[N, H, K, V]`, all in
            one float dtype (the names as in `_chunk_local`).

    Returns:
        `(h [N, H, NC, K, V]` the state at each chunk's start, `v_new [N, H, NC, C, V]`, `S [N, H, K, V]` the state
        after the last chunk`)`.
    """
    S = S0
    hs, us = [], []
    for c in range(U.shape[2]):
        u = U[:, :, c] - W[:, :, c] @ S  # [N, H, C, V]
        hs.append(S)
        us.append(u)
        S = chunk_decay[:, :, c, None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ u
    if not hs:
        return U.new_empty(*U.shape[:3], *S0.shape[-2:]), U, S
    return torch.stack(hs, 2), torch.stack(us, 2), S


def _chunk_output(local, h, v_new, scale, T):
    """Each chunk's output from its initial state h and new values v_new: `[B, H, NC, ...]` -> o `[B, T, H, V]`."""
    out = [scale * (local["q_decayed"][:, :, c] @ h[:, :, c] + local["attn"][:, :, c] @ v_new[:, :, c])
           for c in range(h.shape[2])]
    o = torch.stack(out, 2)  # [B, H, NC, C, V]
    B, H, NC, C, V = o.shape
    return o.movedim(1, 3).reshape(B, NC * C, H, V)[:, :T]


def _chunk_fixed_length(q, k, v, g, beta, scale, S0, chunk_size):
    """Chunked form on equal-length sequences; all inputs already in the compute dtype.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; S0: [B, H, K, V]. Returns (o [B, T, H, V], S [B, H, K, V]).
    """
    local = _chunk_local(q, k, v, g, beta, chunk_size)
    h, v_new, S = chunk_state_pass(local["U"], local["W"], local["k_to_end"], local["chunk_decay"], S0)
    return _chunk_output(local, h, v_new, scale, q.shape[1]), S


def _chunk_inputs(q, k, v, g, beta, scale, initial_state, use_qk_l2norm):
    """The chunked forms' inputs in their compute dtype: `(dtype, scale, q, k, v, g, beta)`, q and k L2-normed
    when asked, g 0 and beta 1 when None, scale K^-1/2 when None."""
    B, T, H, K = k.shape
    dtype = compute_dtype(q, k, v, initial_state)
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    gf = torch.zeros(B, T, H, dtype=dtype, device=q.device) if g is None else g.to(dtype)
    bf = torch.ones(B, T, H, dtype=dtype, device=q.device) if beta is None else beta.to(dtype)
    return dtype, scale, qf, kf, vf, gf, bf


def naive_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel gated delta rule (WY representation); same contract as the recurrent form.

    Within a chunk of `chunk_size` tokens the recurrence is solved with one unit-lower-triangular solve; only
    the chunk-to-chunk state update is sequential. Differentiable end to end (autograd through
    `solve_triangular`), so it also serves as the CPU training path.
    """
    B, _, H, K, V, N = _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype, scale, qf, kf, vf, gf, bf = _chunk_inputs(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)
    if cu_seqlens is None:
        S0 = torch.zeros(B, H, K, V, dtype=dtype, device=q.device) if initial_state is None else initial_state.to(dtype)
        o, S = _chunk_fixed_length(qf, kf, vf, gf, bf, scale, S0, chunk_size)
        return o.to(v.dtype), (S if output_final_state else None)
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(N):
        s, e = bounds[n], bounds[n + 1]
        S0 = (torch.zeros(1, H, K, V, dtype=dtype, device=q.device) if initial_state is None
              else initial_state[n : n + 1].to(dtype))
        if e == s:
            finals.append(S0)
            continue
        o_n, S = _chunk_fixed_length(qf[:, s:e], kf[:, s:e], vf[:, s:e], gf[:, s:e], bf[:, s:e], scale, S0, chunk_size)
        outs.append(o_n)
        finals.append(S)
    o = torch.cat(outs, 1) if outs else vf[:, :0]
    return o.to(v.dtype), (torch.cat(finals, 0) if output_final_state else None)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule: fla's Triton kernels on CUDA with `backend="triton"`, the PyTorch reference otherwise.

    Arguments and returns as in `naive_recurrent_gated_delta_rule`. The final state is float32. With the backend's
    `segment_state_pass` > 1, a prefill's state pass may run segment-parallel (`jetnas.ops.segment_pass`); with its
    `affine_state_pass` on, in the affine form (`jetnas.ops.triton_affine_pass`).
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    backend = as_backend(backend)
    if backend.runs_fla(q):
        return _fla.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                           use_qk_l2norm, segments=backend.segment_state_pass,
                                           affine=backend.affine_state_pass)
    return naive_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                        use_qk_l2norm)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (decode): fla's fused recurrent kernel on CUDA with `backend="triton"`,
    the reference recurrence otherwise. Arguments and returns as in `naive_recurrent_gated_delta_rule`."""
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if as_backend(backend).runs_fla(q):
        return _fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                     cu_seqlens, use_qk_l2norm)
    return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                            use_qk_l2norm)
