import torch
from torch.autograd.function import once_differentiable


# ---------------------------------------------------------------------------
# Fused, chunked LM-head log-probs (spec: shared/spec/fused-logprob-and-grpo-pitfalls.md)
# Never holds the full (N, V) logits: rows go through in chunks of C, each chunk's
# fp32 logits buffer is reused, and backward recomputes them; only O(N) row stats
# (max m, log-sum s, entropy) are saved besides h, W, y.
# ---------------------------------------------------------------------------

def _chunk_logits(h, w32, inv_t, out):
    # (C, H) @ (H, V) -> (C, V), fp32; forward and backward share this so P matches lse
    torch.mm(h.to(out.dtype), w32.t(), out=out)
    return out.mul_(inv_t) if inv_t != 1.0 else out


class FusedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size):
        N, V = hidden.shape[0], weight.shape[0]
        C, inv_t = max(1, min(int(chunk_size), N)), 1.0 / float(temperature)
        # fp32 head for bf16/fp16/fp32 inputs (fp64 stays fp64, so gradcheck is meaningful)
        acc = dict(dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
        # explicit dtypes, autocast off: a backward run outside autocast recomputes the same Z
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w32 = weight.to(acc["dtype"])                        # (V, H), cast once per call
            logp, mx, logs = (torch.empty(N, **acc) for _ in range(3))
            ent = torch.empty(N, **acc) if with_entropy else None
            zbuf = torch.empty(C if N else 0, V, **acc)           # (C, V), reused by every chunk
            pbuf = torch.empty_like(zbuf) if with_entropy else None
            for r0 in range(0, N, C):
                r1 = min(r0 + C, N)
                z = _chunk_logits(hidden[r0:r1], w32, inv_t, zbuf[: r1 - r0])   # (c, V)
                zy = z.gather(1, targets[r0:r1, None])                           # (c, 1), before z is reused
                m = z.amax(dim=1, keepdim=True)                                  # (c, 1)
                z.sub_(m)                                                        # z - m <= 0, exact near the max
                if with_entropy:
                    p = torch.exp(z, out=pbuf[: r1 - r0])                        # (c, V) unnormalised probs
                    ls = p.sum(dim=1, keepdim=True).log_()                       # (c, 1)
                    # S = lse - sum p*z = -sum p*(z - lse): the log-prob is z - lse, never log(P)
                    # (an underflowed p would give 0 * -inf = NaN); no lse - E[z] cancellation
                    ent[r0:r1] = -(p.mul_(z.sub_(ls)).sum(dim=1) * (-ls.squeeze(1)).exp())
                else:
                    ls = z.exp_().sum(dim=1, keepdim=True).log_()                # (c, 1), z is spent
                # lse = m + log s is kept as the pair (m, log s): rounding m + log s to one fp32
                # costs up to ulp(m) in log p_y, i.e. the whole 1 - p_y signal of a confident row
                mx[r0:r1], logs[r0:r1] = m.squeeze(1), ls.squeeze(1)
                logp[r0:r1] = ((zy - m) - ls).squeeze(1)
        ctx.set_materialize_grads(False)    # an unused entropy output -> grad None, costs nothing
        ctx.inv_t, ctx.C = inv_t, C
        ctx.save_for_backward(hidden, weight, targets, mx, logs, *([ent] if with_entropy else []))
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g, e=None):
        h, W, y, mx, logs, *rest = ctx.saved_tensors
        ent = rest[0] if rest else None
        need_h, need_w = ctx.needs_input_grad[:2]
        nones = (None, None, None, None)                         # targets, tau, flag, chunk size
        if (g is None and e is None) or not (need_h or need_w):
            return (None, None) + nones
        N, H, V, C, inv_t = h.shape[0], h.shape[1], W.shape[0], ctx.C, ctx.inv_t
        acc = dict(dtype=mx.dtype, device=h.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            w32 = W.to(acc["dtype"])                                            # (V, H)
            # G is linear in (g, e): fold 1/tau (from z = W h / tau) and 1/s (P = e^(z-m) / s)
            # into per-row scalars, O(N) work instead of extra (C, V) passes
            r = (-logs).exp_().mul_(inv_t)                                      # (N,)  1 / (s tau)
            g = g.to(acc["dtype"]) if g is not None else torch.zeros(N, **acc)  # (N,)
            if e is not None:   # G = -e^(z-m) (a (z-m) + b) + g onehot/tau, with LP + S = (z-m) + (S - log s)
                e = e.to(acc["dtype"])
                a, b = e * r, (g + e * (ent - logs)) * r                        # (N,), (N,)
            dh = torch.empty(N, H, **acc) if need_h else None                   # (N, H)
            dW = torch.zeros(V, H, **acc) if need_w else None                   # (V, H) fp32 accumulator
            zbuf = torch.empty(C if N else 0, V, **acc)
            pbuf = torch.empty_like(zbuf) if e is not None else None
            gt = g * inv_t                                                      # (N,) onehot term
            for r0 in range(0, N, C):
                r1 = min(r0 + C, N)
                hc = h[r0:r1]
                z = _chunk_logits(hc, w32, inv_t, zbuf[: r1 - r0])              # (c, V), same ops as forward
                z.sub_(mx[r0:r1, None])                                         # z - m, as in forward
                if e is None:   # G = (g onehot - P g) / tau, built in the one buffer
                    G = z.exp_().mul_(-(g[r0:r1] * r[r0:r1])[:, None])
                else:           # G = (g onehot - P (g + e (LP + S))) / tau
                    p = torch.exp(z, out=pbuf[: r1 - r0])
                    G = z.mul_(a[r0:r1, None]).add_(b[r0:r1, None]).mul_(p).neg_()
                G.scatter_add_(1, y[r0:r1, None], gt[r0:r1, None])              # + g/tau at the target
                if need_h:
                    torch.mm(G, w32, out=dh[r0:r1])                             # (c, V) @ (V, H)
                if need_w:
                    dW.addmm_(G.t(), hc.to(acc["dtype"]))                       # (V, c) @ (c, H), fp32 sum
        return (dh.to(h.dtype) if need_h else None,
                dW.to(W.dtype) if need_w else None) + nones


def fused_logprobs(hidden, weight, targets, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_size: int = 256):
    """hidden (N, H) any float dtype, weight (V, H), targets (N,) int64 -> logp (N,) fp32,
    or (logp, ent) when with_entropy. Same code path for old / ref / current passes."""
    return FusedLogProb.apply(hidden, weight, targets.long(), float(temperature), bool(with_entropy),
                              int(chunk_size))
