#!/usr/bin/env python3
"""Manual check that a model irbridge saved loads in Hugging Face transformers and computes the
same log-probs, token by token.

Usage:
    scripts/check_hf_load.py MODEL_DIR [--irbridge target/release/irbridge] [--tol 1e-4]

Loads MODEL_DIR with AutoModelForCausalLM and AutoTokenizer, greedily continues a fixed prompt
(to show the model is usable, not to judge it), then scores fixed rows both ways:
- in transformers: ids = tok(prompt + completion + eos), one forward in fp32,
  log_softmax(logits[t-1])[ids[t]] for every completion token t (REFERENCE §2);
- in irbridge: `irbridge logps --per-token` on the same rows written to a temporary JSONL.
Prints the token counts, the max |difference| of the per-token log-probs and of the
per-sequence sums, and exits 1 when a count differs or the per-token difference exceeds --tol.

Needs torch, transformers and safetensors (see docs/training.md for the venv); not part of CI.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "### Instruction:\nName three primary colours.\n\n### Response:\n"

# Plain-text rows of the shapes the trainers see: a text row (every token trained) and
# prompt/completion rows (only the completion trained), including an Alpaca-style prompt.
ROWS = [
    {"text": "Anarchism is a political philosophy and movement that is sceptical of authority."},
    {"prompt": "The capital of France is", "completion": " Paris, a city on the Seine."},
    {"prompt": PROMPT, "completion": "Red, yellow and blue."},
    {
        "prompt": "Q: What is 12 times 12?\nA:",
        "completion": " 144. Twelve twelves make a gross, which is 144.",
    },
]


def hf_token_logps(model, tok, row):
    """Completion token ids and their log-probs under the transformers model."""
    eos = tok.eos_token
    if "text" in row:
        ids = tok(row["text"] + eos)["input_ids"]
        start = 1  # every token but the first has a prediction
    else:
        prompt_ids = tok(row["prompt"])["input_ids"]
        ids = tok(row["prompt"] + row["completion"] + eos)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids, "prompt is not a token prefix (not a row for this check)"
        start = len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[t - 1, ids[t]].item() for t in range(start, len(ids))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--irbridge", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "irbridge"))
    ap.add_argument("--tol", type=float, default=1e-4, help="max |per-token difference| accepted")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    print(f"loaded {args.model_dir}: {type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters")

    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    print("greedy continuation:", repr(tok.decode(out[0][enc["input_ids"].shape[1] :])))

    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "rows.jsonl")
        with open(data, "w") as f:
            for r in ROWS:
                f.write(json.dumps(r) + "\n")
        res = subprocess.run(
            [args.irbridge, "logps", "--model", args.model_dir, "--data", data, "--max-length", "256", "--per-token"],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            sys.exit(f"irbridge logps failed:\n{res.stderr}")
        ours = [json.loads(line) for line in res.stdout.splitlines()]

    worst_tok, worst_sum, ok = 0.0, 0.0, True
    for row, line in zip(ROWS, ours):
        hf = hf_token_logps(model, tok, row)
        ib = line["completion_token_logps"]
        if len(hf) != len(ib):
            print(f"{line['source']}: {len(hf)} completion tokens in transformers, {len(ib)} in irbridge")
            ok = False
            continue
        d_tok = max(abs(a - b) for a, b in zip(hf, ib))
        d_sum = abs(sum(hf) - line["completion_logps"])
        worst_tok, worst_sum = max(worst_tok, d_tok), max(worst_sum, d_sum)
        print(f"{line['source']}: {len(ib)} tokens, sum {line['completion_logps']:.6f} (irbridge) vs {sum(hf):.6f} (transformers), max |per-token diff| {d_tok:.3e}")
    print(f"max |per-token log-prob diff| {worst_tok:.3e}, max |sequence sum diff| {worst_sum:.3e} (tolerance {args.tol:g})")
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}")
    if not ok or worst_tok > args.tol:
        sys.exit(1)


if __name__ == "__main__":
    main()
