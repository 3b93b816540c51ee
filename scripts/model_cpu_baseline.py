#!/usr/bin/env python3
"""PyTorch (transformers) forward + backward tokens/s on the same batch as `benches/model_cpu.rs`.

The golden batch of each fixture model (input_ids [B, T], lengths), the same objective (sum of the
next-token log-probs over real tokens), f32 on the CPU, torch using every core. Run it right after
`cargo bench --bench model_cpu` on the same machine to put the two side by side:

    python3 scripts/model_cpu_baseline.py [../shared/fixtures]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

fixtures = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent.parent / "shared/fixtures")
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print("| model | tokens | median fwd+bwd | tokens/s |")
print("|---|---|---|---|")
for name in ["tiny-gpt2", "tiny-llama"]:
    g = load_file(str(fixtures / "golden" / f"{name}.safetensors"))
    ids, lengths = g["input_ids"], g["lengths"]
    B, T = ids.shape
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    model = AutoModelForCausalLM.from_pretrained(fixtures / "models" / name, dtype=torch.float32)
    model.train(False)  # no dropout, as irbridge

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        (logp * mask[:, 1:]).sum().backward()

    step()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = int(lengths.sum())
    print(f"| {name} | {tokens} | {med:.3f} s | {tokens / med:.0f} |")
