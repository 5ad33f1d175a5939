"""transformers' side of benchmarks/cpu_generate.py; runs in the torch interpreter (.venv-ref).

    python hf_generate_worker.py MODEL_DIR PROMPTS.json MAX_NEW BATCH REPEATS THREADS
Prints one JSON line: {"tokens": n, "seconds": s} for the best of REPEATS timed runs.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, prompts_file, max_new, batch, repeats, threads = sys.argv[1:7]
    max_new, batch, repeats = int(max_new), int(batch), int(repeats)
    torch.set_num_threads(int(threads))
    prompts = json.loads(open(prompts_file).read())[:batch]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = model.config.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    best = None
    with torch.no_grad():
        for i in range(repeats + 1):  # the first run warms up
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=pad)
            dt = time.perf_counter() - t
            n = int((out.shape[1] - width) * out.shape[0])
            if i > 0 and (best is None or dt < best[1]):
                best = (n, dt)
    print(json.dumps({"tokens": best[0], "seconds": best[1]}))


if __name__ == "__main__":
    main()
