#!/usr/bin/env python3
"""transformers/PyTorch forward + backward tokens/s on the shapes of benches/model_gpu.rs.

GPT-2-124M- and Llama-3.2-1B-shaped models from a config (random init, no files), a full [B, T]
batch of seeded random ids, the same objective as irbridge (token-mean NLL of the next-token
log-probs, log-softmax in fp32), median wall time of --iters synchronised steps after 2 warm-ups:
  - bf16: fp32 weights under torch.autocast(bfloat16) (irbridge's bf16 mode: fp32 masters, bf16
    activations and GEMM operands, fp32 accumulation), SDPA attention;
  - f32: fp32 everywhere with TF32 off (irbridge's f32 mode), SDPA attention.

    python3 scripts/model_gpu_baseline.py [--json PATH] [--iters 10]
    python3 scripts/model_gpu_baseline.py --combine irbridge.json torch.json   # one table

Without torch or a GPU it prints `skipped: no GPU (<reason>)` and exits 0.
"""
import argparse
import json
import statistics
import sys
import time

WARMUP = 2
# Keep in sync with shapes() in benches/model_gpu.rs.
SHAPES = [
    ("gpt2-124M", dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                       n_head=12, layer_norm_epsilon=1e-5, activation_function="gelu_new"), 8, 1024),
    ("llama-1B", dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192),
                      tie_word_embeddings=True, hidden_act="silu"), 8, 1024),
]
COLUMNS = "| model | dtype | impl | batch × seq | params | median ms | tokens/s |"


def bench(torch, name, cfg_dict, b, t, dtype, iters, out):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg_dict)
    model_type = cfg.pop("model_type")
    if "rope_scaling" in cfg and int(transformers_version().split(".")[0]) >= 5:
        # transformers 5 keeps theta and the scaling rule together in `rope_parameters`.
        cfg["rope_parameters"] = dict(cfg.pop("rope_scaling"), rope_theta=cfg.pop("rope_theta"))
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.float32)
    model.train(False)  # no dropout, as irbridge
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device="cuda").manual_seed(12345)
    ids = torch.randint(0, config.vocab_size, (b, t), device="cuda", generator=gen)
    autocast = dtype == "bf16"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        (-logp.mean()).backward()

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out.append(dict(model=name, dtype=dtype, batch=b, seq=t, tokens=b * t, params=n_params,
                    median_ms=med * 1e3, tokens_per_s=b * t / med, impl="torch eager (sdpa)"))
    print(f"{name} {dtype} torch: {med * 1e3:.1f} ms/step", file=sys.stderr)
    del model
    torch.cuda.empty_cache()


def print_table(title, rows):
    print()
    print(f"### {title}")
    print()
    print(COLUMNS)
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['impl']} | {r['batch']} × {r['seq']} | "
              f"{r['params'] / 1e6:.0f}M | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} |")


def combine(paths):
    """One table from benches/model_gpu.rs --json and this script's --json."""
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
    order = {name: i for i, (name, _, _, _) in enumerate(SHAPES)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), r["dtype"] != "bf16", r["impl"] != "irbridge"))
    print_table(f"Forward + backward tokens/s: irbridge and PyTorch on {', '.join(sorted(set(devices)))}", rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results as JSON to this path")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="print one table from these reports and exit")
    args = ap.parse_args()
    if args.combine:
        combine(args.combine)
        return 0
    if args.iters < 3:
        ap.error("--iters must be at least 3")
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"skipped: no GPU (torch/transformers not importable: {e})")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no GPU (torch.cuda.is_available() is False)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name, cfg, b, t in SHAPES:
        for dtype in ["bf16", "f32"]:
            bench(torch, name, cfg, b, t, dtype, args.iters, rows)
    device = torch.cuda.get_device_name(0)
    print_table(f"transformers {transformers_version()} / torch {torch.__version__} on {device}", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, iters=args.iters, rows=rows), f, indent=2)
        print(f"wrote {args.json}")
    return 0


def transformers_version():
    import transformers
    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
