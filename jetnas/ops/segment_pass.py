"""The segment-parallel state pass of the chunked gated delta rule: fewer sequential steps at small batch.

In the chunked (WY) form the only sequential work is the inter-chunk state pass (`delta_rule.chunk_state_pass`):
per chunk c, `v_new_c = U_c - W_c S_c` and `S_{c+1} = d_c S_c + Kt_c^T v_new_c` (d_c the chunk's decay, Kt_c its
keys carried to the chunk's end). That is affine in the state:

    S_{c+1} = M_c S_c + N_c,    M_c = d_c I - Kt_c^T W_c  [K, K],    N_c = Kt_c^T U_c  [K, V]

so a run of chunks composes to one affine map too. Split each sequence's chunks into P segments and:

1. (parallel over segments) summarise each segment as its map `(M_seg, N_seg)`: the ordinary state pass run on the
   segment with values `[U | 0]` and initial state `[0 | I]` (width V + K) ends in `[N_seg | M_seg]`;
2. (sequential over P, tiny) combine: `S_start[0] = S0`, `S_start[p + 1] = M_p S_start[p] + N_p`;
3. (parallel over segments) the ordinary state pass on each segment from `S_start[p]`, which gives every chunk's
   state and new values as the sequential pass would, up to float rounding (the products are grouped differently).

The sequential depth drops from NC chunk steps to about 2 NC / P + P. On a GPU the plain pass runs one thread
block per (sequence, head, value block) over all NC chunks; at batch 1 that is a few blocks on a hundred-odd SMs,
so its time is NC steps of latency, and the segments fill the idle SMs. On CPU nothing is gained: this module's
PyTorch form is the readable reference the GPU path (`jetnas.ops._fla`, fla's kernels) is written against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jetnas.ops.delta_rule import _check_inputs, _chunk_inputs, _chunk_local, _chunk_output, chunk_state_pass

StatePass = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def segment_layout(num_chunks: int, segments: int) -> tuple[int, int]:
    """How `num_chunks` chunks split into at most `segments` segments of whole chunks.

    Every segment has `ceil(num_chunks / segments)` chunks except the last, which is shorter when the division is not
    exact; the count is reduced so that no segment is empty (10 chunks in 4 segments: 3 + 3 + 3 + 1; 9 chunks in 4:
    3 + 3 + 3, three segments).

    Returns:
        `(chunks_per_segment, number_of_segments)`.

    Raises:
        ValueError: `num_chunks` < 1 or `segments` < 1.
    """
    if num_chunks < 1 or segments < 1:
        raise ValueError(f"need num_chunks >= 1 and segments >= 1, got num_chunks={num_chunks}, segments={segments}")
    per = -(-num_chunks // segments)
    return per, -(-num_chunks // per)


def segment_count(batch: int, heads: int, seq_len: int, head_v_dim: int, segments: int, num_sms: int,
                  chunk_size: int = 64) -> int:
    """How many segments the GPU path splits each sequence's state pass into; 1 means the plain pass.

    The rule: split only when the plain pass leaves SMs idle, i.e. `batch * heads * ceil(head_v_dim / 64)` (its
    thread blocks at fla's widest value block, 64) is below `num_sms`: then its time is the latency of
    `ceil(seq_len / chunk_size)` dependent chunk steps, which the segments shorten, and the extra blocks of the two
    passes run on otherwise idle SMs. When the blocks already fill the GPU the split only adds work (two passes, one
    of them V + K wide). The count is at most `segments` and leaves every segment at least 2 chunks: below that the
    combine's P sequential small products (a few microseconds of launches each, against ~1 us a chunk step) cost
    more than the chunk steps they remove. `segment_layout` then fixes the segments' lengths.
    """
    if segments <= 1 or batch * heads * -(-head_v_dim // 64) >= num_sms:
        return 1
    chunks = -(-seq_len // chunk_size)
    return max(1, min(segments, chunks // 2))


def combine_segment_maps(M: torch.Tensor, N: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    """Each segment's initial state from the segments' affine maps: `S[0] = S0`, `S[p + 1] = M[p] S[p] + N[p]`.

    Args:
        M: `[P, *batch, K, K]` the segments' state transforms (in order along the sequence).
        N: `[P, *batch, K, V]` their states from a zero initial state.
        initial_state: `[*batch, K, V]`, or None for zeros.

    Returns:
        `[P, *batch, K, V]` the state at the start of each segment, in N's dtype. The last map is not used (the
        last segment's final state comes from running it).
    """
    P, K, V = M.shape[0], M.shape[-1], N.shape[-1]
    if M.shape[:-1] != N.shape[:-1] or M.shape[-2] != K:
        raise ValueError(f"M must be [P, *batch, K, K] and N [P, *batch, K, V], got {list(M.shape)}, {list(N.shape)}")
    batch = M.shape[1:-2]
    Mf, Nf = M.reshape(P, -1, K, K).to(N.dtype), N.reshape(P, -1, K, V)
    if initial_state is None:
        # M[0] @ 0 + N[0] = N[0]: no product for the first step
        starts, first = [Nf.new_zeros(Nf.shape[1:])] + ([Nf[0]] if P > 1 else []), 1
    else:
        if tuple(initial_state.shape) != (*batch, K, V):
            raise ValueError(f"initial_state must be {[*batch, K, V]}, got {list(initial_state.shape)}")
        starts, first = [initial_state.reshape(-1, K, V).to(N.dtype)], 0
    for p in range(first, P - 1):
        starts.append(torch.baddbmm(Nf[p], Mf[p], starts[p]))
    starts = torch.stack(starts)
    return starts.reshape(P, *batch, K, V)


def segment_parallel_state_pass(
    U: torch.Tensor,
    W: torch.Tensor,
    k_to_end: torch.Tensor,
    chunk_decay: torch.Tensor,
    S0: torch.Tensor,
    segments: int,
    state_pass: StatePass = chunk_state_pass,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`state_pass` (same contract as `delta_rule.chunk_state_pass`) computed segment-parallel over the chunks.

    Args:
        U, W, k_to_end, chunk_decay, S0: as in `delta_rule.chunk_state_pass` (`[B, H, NC, C, .]`, `[B, H, K, V]`).
        segments: the most segments to split the NC chunks into (`segment_layout`); 1 runs `state_pass` as it is.
        state_pass: the sequential pass to run on the segments, twice (summaries, then from the combined states).

    Returns:
        `(h, v_new, S)` as `state_pass` returns them for the whole sequence.
    """
    B, H, NC, _, V = U.shape
    K = W.shape[-1]
    per, P = segment_layout(NC, segments)
    if P == 1:
        return state_pass(U, W, k_to_end, chunk_decay, S0)
    pad = P * per - NC
    if pad:
        # identity chunks (nothing written, decay 1) pad the last segment: its map and final state are unchanged
        U, W, k_to_end = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (U, W, k_to_end))
        chunk_decay = torch.nn.functional.pad(chunk_decay, (0, pad), value=1.0)

    def split(x):  # [B, H, P * per, ...] -> [B * P, H, per, ...], segment-major within each sequence
        x = x.reshape(B, H, P, per, *x.shape[3:]).movedim(2, 1)
        return x.reshape(B * P, H, per, *x.shape[4:])

    Us, Ws, Ks, Ds = map(split, (U, W, k_to_end, chunk_decay))
    # pass 1: [U | 0] from [0 | I] ends in [N_seg | M_seg]: the map applied to a zero state, then to the identity
    eye = torch.eye(K, dtype=S0.dtype, device=S0.device).expand(B * P, H, K, K)
    _, _, maps = state_pass(torch.cat([Us, Us.new_zeros(*Us.shape[:-1], K)], -1), Ws, Ks, Ds,
                            torch.cat([S0.new_zeros(B * P, H, K, V), eye], -1))
    maps = maps.reshape(B, P, H, K, V + K).movedim(1, 0)  # [P, B, H, K, V + K]
    starts = combine_segment_maps(maps[..., V:], maps[..., :V], S0)  # [P, B, H, K, V]
    # pass 2: every segment from its true initial state
    h, v_new, finals = state_pass(Us, Ws, Ks, Ds, starts.movedim(0, 1).reshape(B * P, H, K, V))

    def join(x):  # [B * P, H, per, ...] -> [B, H, NC, ...]
        x = x.reshape(B, P, H, per, *x.shape[3:]).movedim(1, 2)
        return x.reshape(B, H, P * per, *x.shape[4:])[:, :, :NC]

    return join(h), join(v_new), finals.reshape(B, P, H, K, V)[:, -1]


def segment_parallel_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    segments: int = 4,
    state_pass: StatePass = chunk_state_pass,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked gated delta rule with its state pass segment-parallel; the contract of
    `delta_rule.naive_chunk_gated_delta_rule` (equal-length sequences only: no `cu_seqlens`).

    Args:
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, chunk_size: as in
            `naive_chunk_gated_delta_rule`.
        segments: the most segments per sequence (`segment_layout`: whole chunks, the last one shorter).
        state_pass: the sequential state pass run on the segments (`delta_rule.chunk_state_pass` by default).

    Returns:
        `(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] (float32, float64 for float64 inputs) or None)`.
    """
    B, T, H, K, V, _ = _check_inputs(q, k, v, g, beta, initial_state, None)
    if chunk_size < 1 or segments < 1:
        raise ValueError(f"chunk_size and segments must be >= 1, got chunk_size={chunk_size}, segments={segments}")
    if T == 0:
        raise ValueError("segment_parallel_chunk_gated_delta_rule needs T >= 1, got T = 0")
    dtype, scale, qf, kf, vf, gf, bf = _chunk_inputs(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)
    S0 = torch.zeros(B, H, K, V, dtype=dtype, device=q.device) if initial_state is None else initial_state.to(dtype)
    local = _chunk_local(qf, kf, vf, gf, bf, chunk_size)
    h, v_new, S = segment_parallel_state_pass(local["U"], local["W"], local["k_to_end"], local["chunk_decay"], S0,
                                              segments, state_pass)
    o = _chunk_output(local, h, v_new, scale, T)
    return o.to(v.dtype), (S if output_final_state else None)
