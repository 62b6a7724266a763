"""Distribution Discriminant Theory (spec section 1): per-token and per-response statistics.

Pure tensor functions, no model and no I/O. For a next-token distribution p = softmax(z), z = logits / tau,
and the token y that the data actually has:

    log p(y)                                    the token's log-likelihood
    H      = -sum_v p(v) log p(v)               entropy
    M2     =  sum_v p(v) (log p(v))^2           second moment of log p under p
    phi    = log p(y) + H                       centered log-likelihood: E[phi] = 0 when y ~ p
    Var    = M2 - H^2                           variance of phi when y ~ p

Per response, Z = sum phi / sqrt(sum Var) is approximately N(0, 1) for the model's own samples (a
martingale sum), so P(N(0,1) <= Z) is a one-sided p-value for "this response is not the model's own".

Two ways to get the token statistics:
  - `token_stats(logits, targets)` from full logits [..., V] (when they exist anyway);
  - `token_stats_from_hidden(hidden, weight, targets)` from the last hidden states and the LM head,
    streaming over the vocabulary in tiles, so memory is O(rows * vocab_chunk) and never N x V.

Numerics of the streaming form. For one row, with m the running maximum of z over the tiles seen so far
and u = z - m <= 0, three sums are kept:
    S0 = sum e^u,   S1 = sum u e^u,   S2 = sum u^2 e^u.
When a new tile raises the maximum to m' (d = m - m' <= 0), every old u becomes u + d, so the old sums
are rescaled before the tile's own sums are added:
    S0 <- e^d S0,   S1 <- e^d (S1 + d S0),   S2 <- e^d (S2 + 2 d S1 + d^2 S0).
Because u <= 0 and d <= 0, S1 and d S0 have the same sign and every term of the S2 update is >= 0: the
rescaling adds no cancellation. At the end, with L = log S0 (so log-sum-exp = m + L):
    log p(y) = z_y - m - L,    H = L - S1/S0,    Var = S2/S0 - (S1/S0)^2   (clamped at 0).
Var is the variance of z under p (shift-invariant), so it is computed relative to the maximum, where
terms are small; its one subtraction loses a few ulps of E[u^2] (measured: <= 5e-6 absolute in float32
against float64 at logits up to ~40). Token sums accumulate in float32, or in float64 when the inputs are
float64; per-response sums over tokens (`aggregate_responses`) always in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PHI_LEVELS = (-1.0, -3.0, -5.0)
OOD_THRESHOLD = -0.1
# sum Var of a response the model is nearly sure about can be ~0; the floor keeps Z finite (0 / eps = 0).
VAR_FLOOR = 1e-12


def centered_log_likelihood(log_probs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """phi_t = log p(y_t) + H(p_t): zero in expectation when y_t is sampled from p_t (the one phi of onsft: the
    audit's statistics and IDFT's weights both read it here)."""
    return log_probs + entropy


@dataclass
class TokenStats:
    """Per-token statistics, each a tensor of the targets' shape."""

    logp: torch.Tensor
    entropy: torch.Tensor
    var: torch.Tensor

    @property
    def phi(self) -> torch.Tensor:
        return centered_log_likelihood(self.logp, self.entropy)

    @property
    def second_moment(self) -> torch.Tensor:
        """sum_v p (log p)^2 = Var + H^2."""
        return self.var + self.entropy.square()

    def __getitem__(self, index) -> TokenStats:
        return TokenStats(self.logp[index], self.entropy[index], self.var[index])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def token_stats(logits: torch.Tensor, targets: torch.Tensor, tau: float = 1.0) -> TokenStats:
    """Statistics of `targets` [...] under softmax(logits [..., V] / tau), from full logits.

    Logits must be finite (a -inf logit would give 0 * -inf in the entropy).
    """
    _check_tau(tau)
    z = logits.to(accumulation_dtype(logits.dtype)) / tau
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    # Two-pass variance: sum p (log p + H)^2 has no cancellation.
    var = (p * (logp_all + entropy.unsqueeze(-1)).square()).sum(-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return TokenStats(logp=logp, entropy=entropy, var=var)


def transform_logits(raw: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """What some architectures do between the LM head's matmul and the logits: a scale (Cohere: *logit_scale,
    Granite: / logits_scaling), then a soft cap (Gemma 2/3: cap * tanh(x / cap)). In place on `raw`."""
    if logit_scale != 1.0:
        raw.mul_(logit_scale)
    if softcap:
        raw.div_(softcap).tanh_().mul_(softcap)
    return raw


def _rescaled(m_old, m_new, s0, s1, s2):
    """The running sums re-expressed relative to a new maximum m_new >= m_old (module docstring)."""
    d = m_old - m_new  # <= 0: how far the old u values move
    scale = d.exp()
    return scale * s0, scale * (s1 + d * s0), scale * (s2 + 2 * d * s1 + d.square() * s0)


def _fused_update(raw: torch.Tensor, m, s0, s1, s2, inv_tau: float):
    """One tile folded in, written as one expression so torch.compile fuses it into a single pass per row
    (no [R, C] temporaries)."""
    z = raw * inv_tau
    m_new = torch.maximum(m, z.amax(dim=-1))
    s0, s1, s2 = _rescaled(m, m_new, s0, s1, s2)
    u = z - m_new.unsqueeze(-1)
    e = u.exp()
    return m_new, s0 + e.sum(-1), s1 + (e * u).sum(-1), s2 + (e * u * u).sum(-1)


_compiled_update = None
_compile_failed = False


def _compiled_or_none():
    global _compiled_update
    if _compiled_update is None and not _compile_failed:
        _compiled_update = torch.compile(_fused_update, dynamic=True)
    return None if _compile_failed else _compiled_update


def _disable_compile(error: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    import sys

    print(
        f"onsft: torch.compile of the fused LM-head kernel failed ({type(error).__name__}); using eager ops "
        f"(same numbers, slower).",
        file=sys.stderr,
    )


class _OnlineSums:
    """Running (m, S0, S1, S2) of one tau for a block of rows; see the module docstring.

    Two equal ways to fold a tile in: eager torch ops into reusable scratch buffers (five passes over the
    tile), or a torch.compile'd kernel that fuses them (about a quarter of the eager cost on CPU, after a
    one-off compile of 10-60 s that torch caches on disk)."""

    def __init__(self, inv_tau: float, fused: bool = False):
        self.inv_tau = inv_tau
        self.fused = fused
        self.m: torch.Tensor | None = None
        self.s0 = self.s1 = self.s2 = None

    def update(self, raw: torch.Tensor, u: torch.Tensor, e: torch.Tensor) -> None:
        """Fold one tile of transformed logits `raw` [R, C] in; `u`, `e` are scratch buffers of raw's shape."""
        if self.m is None:
            # Start from the first tile's maximum: the first rescaling is then by exactly 1.
            self.m = raw.amax(dim=-1) * self.inv_tau  # tau > 0, so the max of z is the scaled max of raw
            self.s0 = torch.zeros_like(self.m)
            self.s1, self.s2 = self.s0.clone(), self.s0.clone()
        kernel = _compiled_or_none() if self.fused else None
        if kernel is not None:
            try:
                self.m, self.s0, self.s1, self.s2 = kernel(raw, self.m, self.s0, self.s1, self.s2, self.inv_tau)
                return
            except Exception as error:  # no C++ compiler / Triton: the eager path computes the same sums
                _disable_compile(error)
        m = torch.maximum(self.m, raw.amax(dim=-1) * self.inv_tau)
        self.s0, self.s1, self.s2 = _rescaled(self.m, m, self.s0, self.s1, self.s2)
        self.m = m
        torch.add(-m.unsqueeze(-1), raw, alpha=self.inv_tau, out=u)  # u = raw / tau - m
        torch.exp(u, out=e)
        self.s0 += e.sum(-1)
        self.s1 += torch.linalg.vecdot(e, u)
        e.mul_(u)
        self.s2 += torch.linalg.vecdot(e, u)

    def finish(self, target_z: torch.Tensor) -> TokenStats:
        log_s0 = self.s0.log()
        mean_u = self.s1 / self.s0
        var = (self.s2 / self.s0 - mean_u.square()).clamp_min(0)
        return TokenStats(logp=target_z - self.m - log_s0, entropy=log_s0 - mean_u, var=var)


def default_chunks(device: torch.device | str) -> tuple[int, int]:
    """(row_chunk, vocab_chunk). On CPU, tiles of ~1 MB stay in cache, which makes the elementwise passes
    several times faster than over one big tile; on GPUs bigger tiles amortise the kernel launches."""
    return (256, 2048) if torch.device(device).type == "cpu" else (2048, 16384)


def token_stats_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    tau: float | Sequence[float] = 1.0,
    *,
    vocab_chunk: int | None = None,
    row_chunk: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    fused: bool = False,
    workers: int | None = None,
) -> TokenStats | list[TokenStats]:
    """Token statistics of `targets` [N] from last hidden states [N, H] and the LM head (weight [V, H],
    bias [V] or None), without materialising the N x V logits.

    logits = transform_logits(hidden @ weight.T + bias, logit_scale, softcap) / tau. The matmul runs in the
    weight's dtype (as the model's own head does) and everything after it in `accumulation_dtype`.
    `tau` may be a list: the logit tiles are then computed once and shared, and a list of TokenStats (one
    per tau) is returned. Memory: three [row_chunk, vocab_chunk] buffers per worker plus O(N) per tau.
    `fused=True` folds tiles in with a torch.compile'd kernel (see `_OnlineSums`); same numbers to ~1e-6.

    On CPU, `workers` threads (default: torch's thread count) each take whole row blocks with one torch
    thread apiece. Tiles are small (they must stay in cache), and splitting every small op across OpenMP
    threads makes all threads wait at each op's barrier; on a shared machine, where a thread is often
    descheduled, that was measured 4-5x slower than independent workers. Results do not depend on it.
    """
    taus = [float(tau)] if isinstance(tau, (int, float)) else [float(t) for t in tau]
    for t in taus:
        _check_tau(t)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    default_rows, default_vocab = default_chunks(weight.device)
    row_chunk = row_chunk or default_rows
    vocab_chunk = vocab_chunk or default_vocab
    n = hidden.shape[0]
    acc = accumulation_dtype(weight.dtype)
    device = weight.device
    hidden = hidden.to(device=device, dtype=weight.dtype)
    targets = targets.to(device).long()
    blocks = list(range(0, n, row_chunk))

    def block_stats(r0: int) -> list[TokenStats]:
        h, row_targets = hidden[r0 : r0 + row_chunk], targets[r0 : r0 + row_chunk]
        with torch.no_grad():  # grad mode is per thread: worker threads do not inherit the caller's
            return _block_stats(h, row_targets, weight, bias, taus, vocab_chunk, logit_scale, softcap, fused, acc)

    workers = (workers or torch.get_num_threads()) if device.type == "cpu" else 1
    per_block = []
    if fused and blocks and _compiled_update is None:
        per_block.append(block_stats(blocks.pop(0)))  # compile once, here, not in several threads at once
    if workers > 1 and len(blocks) > 1:
        from concurrent.futures import ThreadPoolExecutor

        before = torch.get_num_threads()
        torch.set_num_threads(1)  # fresh worker threads take this as their own OpenMP team size
        try:
            with ThreadPoolExecutor(min(workers, len(blocks))) as pool:
                per_block += pool.map(block_stats, blocks)
        finally:
            torch.set_num_threads(before)
    else:
        per_block += [block_stats(r0) for r0 in blocks]
    stats = []
    for k in range(len(taus)):
        parts = [block[k] for block in per_block]
        if not parts:
            empty = torch.empty(0, dtype=acc, device=device)
            stats.append(TokenStats(empty, empty.clone(), empty.clone()))
        else:
            stats.append(TokenStats(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logp", "entropy", "var"))))
    return stats[0] if isinstance(tau, (int, float)) else stats


def _block_stats(h, targets, weight, bias, taus, vocab_chunk, logit_scale, softcap, fused, acc) -> list[TokenStats]:
    """One block of rows through every vocabulary tile: TokenStats per tau."""
    rows, vocab = h.shape[0], weight.shape[0]
    width = min(vocab_chunk, vocab)
    buffers = [torch.empty(rows * width, dtype=acc, device=weight.device) for _ in range(3)]
    sums = [_OnlineSums(1.0 / t, fused) for t in taus]
    for v0 in range(0, vocab, vocab_chunk):
        cols = min(vocab_chunk, vocab - v0)
        raw, u, e = (b[: rows * cols].view(rows, cols) for b in buffers)
        w = weight[v0 : v0 + cols]
        if weight.dtype == acc:
            if bias is None:
                torch.matmul(h, w.T, out=raw)
            else:
                torch.addmm(bias[v0 : v0 + cols].to(acc), h, w.T, out=raw)
        else:
            # Half-precision matmul like the model's head, then float32 from here on.
            tile = h @ w.T
            if bias is not None:
                tile = tile + bias[v0 : v0 + cols]
            raw.copy_(tile)
        transform_logits(raw, logit_scale, softcap)
        for s in sums:
            s.update(raw, u, e)
    # The target's own logit, from its weight row: O(rows * H), independent of the tiling.
    # A batched dot product in the weight's dtype rounds like the tile matmul does (bf16 models).
    picked = torch.bmm(h.unsqueeze(1), weight[targets].unsqueeze(2)).reshape(rows)
    if bias is not None:
        picked = picked + bias[targets]
    picked = transform_logits(picked.to(acc), logit_scale, softcap)
    return [s.finish(picked * s.inv_tau) for s in sums]


# ----------------------------------------------------------------------------------------- per response


def p_value(z: torch.Tensor) -> torch.Tensor:
    """One-sided P(N(0,1) <= Z): small when a response is less likely than the model's own samples."""
    return torch.special.ndtr(z)


def aggregate_responses(
    phi: torch.Tensor, var: torch.Tensor, lengths: Sequence[int] | torch.Tensor, threshold: float = OOD_THRESHOLD
) -> dict[str, torch.Tensor]:
    """Per-response scores from the concatenated response tokens' phi and Var [sum(lengths)].

    Returns tensors [len(lengths)]: n_tokens, sum_phi, mean_phi, sum_var, z, p_value, share_phi_gt_<level>
    for each level in PHI_LEVELS, and ood (mean_phi < threshold). Every length must be >= 1.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=phi.device)
    if bool((lengths < 1).any()):
        raise ValueError("every response needs at least one token")
    if int(lengths.sum()) != phi.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {phi.numel()} tokens")
    # Sums over thousands of tokens: float64 keeps them exact to the tokens' own precision (O(N), cheap).
    dtype = torch.float64
    phi, var = phi.to(dtype), var.to(dtype)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=phi.device), lengths)

    def segment_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(lengths), dtype=dtype, device=phi.device).index_add_(0, segment, values.to(dtype))

    n = lengths.to(dtype)
    sum_phi, sum_var = segment_sum(phi), segment_sum(var)
    z = sum_phi / sum_var.clamp_min(VAR_FLOOR).sqrt()
    scores = {
        "n_tokens": lengths,
        "sum_phi": sum_phi,
        "mean_phi": sum_phi / n,
        "sum_var": sum_var,
        "z": z,
        "p_value": p_value(z),
    }
    for level in PHI_LEVELS:
        scores[share_key(level)] = segment_sum((phi > level).to(dtype)) / n
    scores["ood"] = scores["mean_phi"] < threshold
    return scores


def share_key(level: float) -> str:
    return f"share_phi_gt_{level:g}"


def response_scores(phi: torch.Tensor, var: torch.Tensor, threshold: float = OOD_THRESHOLD) -> dict[str, float]:
    """Scores of one response (phi and Var of its tokens, [T]) as plain Python numbers."""
    batch = aggregate_responses(phi.reshape(-1), var.reshape(-1), [phi.numel()], threshold)
    return {k: (bool(v[0]) if k == "ood" else int(v[0]) if k == "n_tokens" else float(v[0])) for k, v in batch.items()}
