#!/usr/bin/env python3
"""PyTorch baselines for irbridge's fused log-softmax + gather, on the shapes of benches/gpu_bench.rs.

For [8192 x 50257] and [8192 x 128256] in bf16 and f32, times (median of --iters CUDA-event-timed
runs after warm-ups) a device-to-device copy of the logits, then:
  - eager forward: log_softmax(x, dtype=float32) + gather of the targets (ignore_index -100);
  - eager forward + backward: cross_entropy(x, t, ignore_index=-100) and autograd.grad w.r.t. x;
  - torch.compile of both;
  - Liger-Kernel's cross entropy (forward + backward) if `liger_kernel` is importable.
Bytes counted as in gpu_bench.rs (N = R*V*sizeof): copy 2N, forward N, forward + backward 3N.

    python3 scripts/gpu_baseline.py [--json PATH] [--iters 25] [--no-compile]
    python3 scripts/gpu_baseline.py --combine irbridge.json torch.json   # one table from both

Without torch or a GPU it prints `skipped: no GPU (<reason>)` and exits 0.
"""
import argparse
import json
import sys

SHAPES = [(8192, 50257), (8192, 128256)]
IGNORE = -100
WARMUP = 3
COLUMNS = "| shape | dtype | op | median ms | GB counted | GB/s | x copy BW | time / copy |"


def timed_median(torch, fn, iters):
    """Median milliseconds of `iters` back-to-back calls of `fn()`, each between two CUDA events,
    after WARMUP calls; one synchronisation at the end, so launch latency is not timed as idle."""
    for _ in range(WARMUP):
        fn()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(iters):
        fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(events, events[1:]))
    return times[len(times) // 2]


def bench_config(torch, rows, vocab, dtype, iters, use_compile, liger_ce, out):
    import torch.nn.functional as F

    name = {torch.bfloat16: "bf16", torch.float32: "f32"}[dtype]
    shape = f"{rows}x{vocab}"
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.randn(rows, vocab, device="cuda", generator=gen) * 3).to(dtype)
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    t[19::20] = IGNORE
    nb = x.numel() * x.element_size()

    dst = torch.empty_like(x)
    copy_ms = timed_median(torch, lambda: dst.copy_(x), iters)
    del dst
    copy_gbs = 2 * nb / (copy_ms * 1e6)

    def push(op, ms, nbytes):
        gbs = nbytes / (ms * 1e6)
        out.append(dict(shape=shape, dtype=name, op=op, median_ms=ms, bytes=nbytes, gb_per_s=gbs,
                        fraction_of_copy_bw=gbs / copy_gbs, time_over_copy=ms / copy_ms))

    push("d2d copy (torch reference)", copy_ms, 2 * nb)

    def fwd(x, t):
        lp = torch.log_softmax(x, dim=-1, dtype=torch.float32)
        keep = t != IGNORE
        return lp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1) * keep

    def attempt(op, fn, nbytes):
        try:
            push(op, timed_median(torch, fn, iters), nbytes)
        except Exception as e:  # report and carry on: one failing variant must not hide the rest
            print(f"{op} on {shape} {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        torch.cuda.empty_cache()

    def grad_of(loss_fn):
        def run():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(xg, t), xg)
            return g
        return run

    def ce(a, b):
        return F.cross_entropy(a, b, ignore_index=IGNORE)

    attempt("torch eager fwd (log_softmax fp32 + gather)", lambda: fwd(x, t), nb)
    attempt("torch eager cross_entropy fwd+bwd", grad_of(ce), 3 * nb)
    if use_compile:
        cfwd = torch.compile(fwd, dynamic=False)
        attempt("torch.compile fwd (log_softmax fp32 + gather)", lambda: cfwd(x, t), nb)
        attempt("torch.compile cross_entropy fwd+bwd", grad_of(torch.compile(ce, dynamic=False)), 3 * nb)
    if liger_ce is not None:
        attempt("liger cross_entropy fwd+bwd", grad_of(lambda a, b: liger_ce(a, b, ignore_index=IGNORE)), 3 * nb)
    del x, t
    torch.cuda.empty_cache()


def print_table(title, rows):
    print()
    print(f"### {title}")
    print()
    print("Bytes counted (N = R*V*sizeof): copy 2N, forward N, forward+backward 3N.")
    print()
    print(COLUMNS)
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['op']} | {r['median_ms']:.3f} | {r['bytes'] / 1e9:.2f} | "
              f"{r['gb_per_s']:.0f} | {r['fraction_of_copy_bw']:.2f} | {r['time_over_copy']:.2f} |")


def combine(paths):
    """One table from several JSON reports (gpu_bench --json and this script's --json)."""
    rows, devices = [], []
    for p in paths:
        try:
            with open(p) as f:
                rep = json.load(f)
        except (OSError, ValueError) as e:
            print(f"(no results from {p}: {e})")
            continue
        devices.append(rep.get("device", "?"))
        rows.extend(rep["rows"])
    order = {s: i for i, s in enumerate(f"{r}x{v}" for r, v in SHAPES)}
    rows.sort(key=lambda r: (order.get(r["shape"], 99), r["dtype"] != "bf16"))
    print_table(f"Combined: irbridge kernels and PyTorch baselines on {', '.join(sorted(set(devices)))}", rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results as JSON to this path")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="print one table from these reports and exit")
    args = ap.parse_args()
    if args.combine:
        combine(args.combine)
        return 0
    if args.iters < 20:
        ap.error("--iters must be at least 20")
    try:
        import torch
    except ImportError as e:
        print(f"skipped: no GPU (torch is not importable: {e})")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no GPU (torch.cuda.is_available() is False)")
        return 0
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as liger_ce
        liger_note = "Liger-Kernel cross entropy: included"
    except ImportError:
        liger_ce = None
        liger_note = "Liger-Kernel: not installed"
    device = torch.cuda.get_device_name(0)
    print(f"gpu_baseline on {device}, torch {torch.__version__}, median of {args.iters} runs; {liger_note}")
    rows = []
    for rows_, vocab in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            bench_config(torch, rows_, vocab, dtype, args.iters, not args.no_compile, liger_ce, rows)
    print_table(f"PyTorch baselines on {device} (torch {torch.__version__}; {liger_note})", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, iters=args.iters, liger=liger_note, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
