import pytest
import torch

from _fused import fused_logprobs

torch.set_float32_matmul_precision("highest")   # no TF32: fp32 tolerances below are real


# ---- helpers -------------------------------------------------------------------------------

def dense_reference(h, W, y, tau=1.0):
    """Naive dense fp64 path: log_softmax of the full logits, gather, entropy as -sum p log p."""
    lp = torch.log_softmax((h.double() @ W.double().T) / tau, dim=-1)    # (N, V)
    return lp.gather(1, y[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def upstream(n, seed=0):
    """Random per-token upstream grads with zeros and negatives (.sum() would hide scaling bugs)."""
    gen = torch.Generator().manual_seed(seed)
    g, e = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    g[::4], e[1::5] = 0.0, 0.0
    return g, e


def values_and_grads(fn, h, W, g, e):
    """Run fn(h, W) -> (logp, ent) under autograd with upstream (g, e); return values and grads."""
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    logp, ent = fn(h, W)
    torch.autograd.backward((logp, ent), (g.to(logp.dtype), e.to(ent.dtype)))
    return logp.detach(), ent.detach(), h.grad, W.grad


def make(n, hd, v, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hd, generator=gen) * scale).to(dtype)
    W = (torch.randn(v, hd, generator=gen) / hd ** 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    return h, W, y


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


# ---- 1. fp32 values and gradients ------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 0.7, 1.3])
def test_fp32_logprobs_entropy_and_grads_match_dense_reference(tau):
    h, W, y = make(97, 33, 1000, scale=2.0)
    g, e = upstream(97)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, tau, True, 16), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, tau), h, W, g, e)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        assert_close(a, b)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_logprob_only_grads_match_dense_reference(tau):
    h, W, y = make(50, 16, 300, scale=2.0)
    g, _ = upstream(50)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    logp = fused_logprobs(hh, WW, y, tau, False, 8)
    logp.backward(g)
    hr, Wr = h.double().requires_grad_(), W.double().requires_grad_()
    ref = dense_reference(hr, Wr, y, tau)[0]
    ref.backward(g.double())
    for a, b in ((logp, ref), (hh.grad, hr.grad), (WW.grad, Wr.grad)):
        assert_close(a.detach(), b.detach())


def test_unused_output_gets_none_grad_and_other_path_is_correct():
    h, W, y = make(20, 8, 40)
    g, e = upstream(20)
    # only entropy in the loss: logp's grad arrives as None
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    fused_logprobs(hh, WW, y, 0.9, True, 6)[1].backward(e)
    hr, Wr = h.clone().double().requires_grad_(), W.clone().double().requires_grad_()
    dense_reference(hr, Wr, y, 0.9)[1].backward(e.double())
    assert_close(hh.grad, hr.grad)
    assert_close(WW.grad, Wr.grad)
    # only logp in the loss although entropy was returned: ent's grad arrives as None
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    fused_logprobs(hh, WW, y, 0.9, True, 6)[0].backward(g)
    hr, Wr = h.clone().double().requires_grad_(), W.clone().double().requires_grad_()
    dense_reference(hr, Wr, y, 0.9)[0].backward(g.double())
    assert_close(hh.grad, hr.grad)
    assert_close(WW.grad, Wr.grad)


# ---- 2. bf16 inputs ----------------------------------------------------------------------------

def test_bf16_inputs_keep_fp32_accuracy_inside_the_head():
    h, W, y = make(64, 64, 1000, dtype=torch.bfloat16, scale=2.0)
    g, e = upstream(64)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 0.7, True, 16), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, 0.7), h, W, g, e)  # same bf16 values, upcast
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    assert_close(got[0], ref[0])
    assert_close(got[1], ref[1])
    for a, b in zip(got[2:], ref[2:]):     # grads: bf16 rounding relative to the largest entry
        torch.testing.assert_close(a.double(), b.double(), atol=1e-2 * b.abs().max().item(), rtol=1e-2)


def test_naive_bf16_logits_miss_by_at_least_1e_3():
    # documents why the head is upcast: bf16 @ bf16 rounds the logits before .float()
    h, W, y = make(64, 64, 1000, dtype=torch.bfloat16, scale=2.0)
    naive = torch.log_softmax((h @ W.T).float() / 0.7, -1).gather(1, y[:, None]).squeeze(1)
    ref = dense_reference(h, W, y, 0.7)[0]
    assert (naive.double() - ref).abs().max() >= 1e-3
    assert (fused_logprobs(h, W, y, 0.7).double() - ref).abs().max() < 1e-5


# ---- 3. gradcheck --------------------------------------------------------------------------

def test_gradcheck_fp64_both_outputs():
    h, W, y = make(5, 4, 7, dtype=torch.float64)
    h.requires_grad_(), W.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, W: fused_logprobs(h, W, y, 0.7, True, 2), (h, W))


# ---- 4. chunk invariance -----------------------------------------------------------------------

def test_chunk_size_does_not_change_logprobs_or_grads():
    n = 37
    h, W, y = make(n, 24, 500, scale=2.0)
    g, e = upstream(n)
    base = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 1.3, True, n), h, W, g, e)
    for c in (1, 7, n + 5):
        got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 1.3, True, c), h, W, g, e)
        for a, b in zip(got, base):    # fp32 rounding only (dW: summation order differs)
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


# ---- 5. odd shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,hd,v,c", [
    (10, 8, 50, 3),      # N % C != 0
    (3, 8, 50, 16),      # N < C
    (1, 5, 50, 4),       # N = 1
    (20, 7, 1000, 6),    # odd H, V = 1000
    (8, 16, 50257, 4),   # GPT-2 vocab
])
def test_odd_shapes_match_dense_reference(n, hd, v, c):
    h, W, y = make(n, hd, v, scale=2.0)
    g, e = upstream(n)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 0.7, True, c), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, 0.7), h, W, g, e)
    for a, b in zip(got, ref):
        assert_close(a, b)


def test_empty_batch_returns_empty_tensors_and_zero_grads():
    h = torch.randn(0, 8, requires_grad=True)
    W = torch.randn(30, 8, requires_grad=True)
    logp, ent = fused_logprobs(h, W, torch.zeros(0, dtype=torch.long), 0.7, True, 4)
    assert logp.shape == ent.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 8)
    assert W.grad is not None and torch.equal(W.grad, torch.zeros(30, 8))


# ---- 6. masked rows --------------------------------------------------------------------------

def test_masked_rows_match_dense_and_padding_never_reaches_grads():
    B, T, H, V = 3, 9, 16, 120
    gen = torch.Generator().manual_seed(3)
    h_full = torch.randn(B, T, H, generator=gen) * 2
    W = torch.randn(V, H, generator=gen) / 4
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:9], mask[1, 1:4], mask[2, 5:7] = True, True, True     # prompts and padding are 0
    G = torch.randn(B, T, generator=gen)                            # per-token upstream grad

    def run(h_in, use_fused):
        h_in, Wp = h_in.clone().requires_grad_(), W.clone().requires_grad_()
        sel = h_in[mask]                                            # select trainable rows first
        lp = fused_logprobs(sel, Wp, tokens[mask], 0.7, False, 4) if use_fused \
            else dense_reference(sel, Wp, tokens[mask], 0.7)[0].float()
        out = torch.zeros(B, T).index_put((mask.nonzero(as_tuple=True)), lp)   # scatter back
        (out * G).sum().backward()
        return out.detach(), h_in.grad, Wp.grad

    out, dh, dW = run(h_full, True)
    out_ref, dh_ref, dW_ref = run(h_full, False)
    assert_close(out[mask], out_ref[mask])
    assert torch.equal(out[~mask], torch.zeros((~mask).sum().item()))
    assert_close(dh, dh_ref)
    assert_close(dW, dW_ref)
    assert torch.equal(dh[~mask], torch.zeros((~mask).sum().item(), H))   # exactly zero
    h_garbage = h_full.clone()
    h_garbage[~mask] = float("nan")
    out2, dh2, dW2 = run(h_garbage, True)
    assert torch.equal(dW2, dW) and torch.equal(out2, out) and torch.equal(dh2[mask], dh[mask])


# ---- 7. confident rows -------------------------------------------------------------------------

@pytest.mark.parametrize("p_y", [0.999, 1 - 1e-6, 1.0])
def test_confident_rows_have_no_nan_and_match_fp64(p_y):
    # logits are built exactly (orthogonal W, so z = h W^T is chosen directly); p_y = 1.0 means a
    # gap of 200 nats, so every other p underflows to 0 in fp32 and log(P) would give NaN entropy
    n, v, tau = 12, 64, 0.7
    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(v, v, generator=gen, dtype=torch.float64))
    z = torch.randn(n, v, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=gen)
    z.scatter_(1, y[:, None], -torch.inf)
    other = torch.logsumexp(z, -1)
    z.scatter_(1, y[:, None], (other + (200.0 if p_y == 1.0 else torch.log(torch.tensor(p_y / (1 - p_y)))))[:, None])
    h, W = (z * tau @ Q).float(), Q.float()                     # z = (h W^T) / tau
    ref_p = dense_reference(h, W, y, tau)[0].exp()
    assert torch.allclose(ref_p, torch.full((n,), p_y, dtype=torch.float64), atol=1e-5, rtol=0)
    g, e = upstream(n)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, tau, True, 5), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, tau), h, W, g, e)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert_close(a, b)


# ---- 8. rho == 1 -----------------------------------------------------------------------------

def test_no_grad_and_grad_calls_give_bit_identical_logprobs():
    h, W, y = make(70, 32, 700, scale=2.0)
    with torch.no_grad():                                               # old / ref pass
        old = fused_logprobs(h, W, y, 0.7, False, 16)
    cur, ent = fused_logprobs(h.clone().requires_grad_(), W.clone().requires_grad_(), y, 0.7, True, 16)
    assert torch.equal(old, cur.detach())                               # ratio exp(cur - old) == 1 exactly
    assert cur.requires_grad and ent.requires_grad


def test_autocast_does_not_change_the_head():
    h, W, y = make(30, 16, 200)
    plain = fused_logprobs(h, W, y, 0.7, True, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = fused_logprobs(h, W, y, 0.7, True, 8)
    assert under[0].dtype == torch.float32
    assert torch.equal(plain[0], under[0]) and torch.equal(plain[1], under[1])


# ---- 9. frozen weight and tied embedding ---------------------------------------------------------

def test_frozen_weight_gets_no_grad_and_skips_the_dW_gemm():
    h, W, y = make(40, 16, 300, scale=2.0)
    g, e = upstream(40)
    hh = h.clone().requires_grad_()
    logp, ent = fused_logprobs(hh, W, y, 0.7, True, 8)          # W.requires_grad is False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.backward((logp, ent), (g, e))
    assert "aten::addmm_" not in {ev.key for ev in prof.key_averages()}   # no dW accumulation ran
    assert W.grad is None
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, 0.7), h, W, g, e)
    assert_close(hh.grad, ref[2])


def test_frozen_hidden_still_gives_weight_grad():
    h, W, y = make(40, 16, 300, scale=2.0)
    g, _ = upstream(40)
    WW = W.clone().requires_grad_()
    fused_logprobs(h, WW, y, 1.3, False, 8).backward(g)
    Wr = W.double().requires_grad_()
    dense_reference(h, Wr, y, 1.3)[0].backward(g.double())
    assert_close(WW.grad, Wr.grad)


def test_tied_embedding_receives_summed_grad():
    V, H, N = 80, 12, 25
    gen = torch.Generator().manual_seed(9)
    emb0 = torch.randn(V, H, generator=gen) / 3
    A = torch.randn(H, H, generator=gen) / H ** 0.5
    x = torch.randint(0, V, (N,), generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    g, e = upstream(N)

    def grad_of(head, dtype):
        emb = emb0.to(dtype).detach().clone().requires_grad_()
        h = torch.tanh(emb[x] @ A.to(dtype))              # embedding lookup feeds the hidden state
        logp, ent = head(h, emb)                          # same matrix unembeds
        torch.autograd.backward((logp, ent), (g.to(logp.dtype), e.to(ent.dtype)))
        return emb.grad

    got = grad_of(lambda h, W: fused_logprobs(h, W, y, 0.7, True, 7), torch.float32)
    ref = grad_of(lambda h, W: dense_reference(h, W, y, 0.7), torch.float64)
    assert_close(got, ref)


# ---- 10. memory (GPU only) -----------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak-memory check needs CUDA")
def test_fused_peak_memory_under_quarter_of_dense_on_gpu():
    N, V, H, C = 4096, 32768, 256, 256
    dev = "cuda"
    h, W = torch.randn(N, H, device=dev), torch.randn(V, H, device=dev) / 16
    y, g = torch.randint(0, V, (N,), device=dev), torch.randn(N, device=dev)

    def peak(fn):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hh, WW).backward(g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    dense = peak(lambda h, W: torch.log_softmax((h @ W.T).float(), -1).gather(1, y[:, None]).squeeze(1))
    fused = peak(lambda h, W: fused_logprobs(h, W, y, 1.0, False, C))
    assert fused < dense / 4
