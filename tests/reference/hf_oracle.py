"""The test oracle: transformers' PyTorch implementation, run in its own interpreter.

Run by the tests as ``$QOQ_REF_PYTHON tests/reference/hf_oracle.py JOBS.json OUT_DIR``; never
imported by the package (torch is not one of its dependencies). JOBS.json is a list of jobs:

- {"kind": "logits", "name": N, "model": DIR, "tokens": [[...], ...]}
    fp32 logits of each token list run alone -> OUT_DIR/N.npz with arrays "0", "1", ...
- {"kind": "greedy", "name": N, "model": DIR, "prompts": [[...], ...], "max_new_tokens": K}
    greedy generation of each prompt alone (stops at EOS) -> OUT_DIR/N.json: list of token lists
- {"kind": "nll", "name": N, "model": DIR, "windows": [[...], ...]}
    fp32 sum of next-token negative log-likelihoods of each window -> OUT_DIR/N.json
- {"kind": "build", "name": N, "config": {config.json keys}, "model": DIR, "seed": S,
   "std": X, "max_shard_size": "..." (optional)}
    a random-weight model built by transformers from the config (every parameter drawn anew:
    matrices N(0, std), embeddings 10x, norm weights 1 + N(0, 0.1)), saved with save_pretrained
    in safetensors (sharded, with an index file, when max_shard_size says so)
- {"kind": "decode_logits", "name": N, "model": DIR, "tokens": [[...], ...], "prefix": P}
    fp32 logits of each token list computed as generate() does: the first P tokens in one call,
    then one token per call through the KV cache -> OUT_DIR/N.npz ("0", "1", ...: [len, V])
- {"kind": "gguf_weights", "name": N, "gguf": FILE, "model": DIR}
    load FILE with transformers' own GGUF loader and DIR (our conversion) with from_pretrained;
    -> OUT_DIR/N.json: {tensor name: max abs difference}, plus the names missing on either side
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)


def _load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


def logits(job, out):
    model = _load(job["model"])
    arrays = {}
    with torch.no_grad():
        for i, toks in enumerate(job["tokens"]):
            ids = torch.tensor([toks], dtype=torch.long)
            arrays[str(i)] = model(input_ids=ids).logits[0].float().numpy()
    np.savez(out / f"{job['name']}.npz", **arrays)


def greedy(job, out):
    model = _load(job["model"])
    results = []
    with torch.no_grad():
        for toks in job["prompts"]:
            ids = torch.tensor([toks], dtype=torch.long)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=job["max_new_tokens"], do_sample=False,
                                 pad_token_id=model.config.eos_token_id)
            results.append([int(t) for t in gen[0, len(toks):]])
    (out / f"{job['name']}.json").write_text(json.dumps(results))


def nll(job, out):
    model = _load(job["model"])
    sums = []
    with torch.no_grad():
        for toks in job["windows"]:
            ids = torch.tensor([toks], dtype=torch.long)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            sums.append(float(-logp.gather(1, ids[0, 1:, None]).sum()))
    (out / f"{job['name']}.json").write_text(json.dumps(sums))


def build(job, out):
    from transformers import AutoConfig

    cfg = dict(job["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    std = job.get("std", 0.08)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p) * std * 10)
            else:
                p.copy_(torch.randn_like(p) * std)
    kw = {"max_shard_size": job["max_shard_size"]} if job.get("max_shard_size") else {}
    model.save_pretrained(job["model"], safe_serialization=True, **kw)


def decode_logits(job, out):
    model = _load(job["model"])
    arrays = {}
    with torch.no_grad():
        for i, toks in enumerate(job["tokens"]):
            p = job["prefix"]
            res = model(input_ids=torch.tensor([toks[:p]]), use_cache=True)
            rows, cache = [res.logits[0]], res.past_key_values
            for t in toks[p:]:
                res = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                rows.append(res.logits[0])
                cache = res.past_key_values
            arrays[str(i)] = torch.cat(rows).float().numpy()
    np.savez(out / f"{job['name']}.npz", **arrays)


def gguf_weights(job, out):
    from transformers import GgufConfig

    path = Path(job["gguf"])
    theirs = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).state_dict()
    ours = _load(job["model"]).state_dict()
    diffs = {k: float((ours[k].float() - theirs[k].float()).abs().max())
             for k in ours if k in theirs and ours[k].shape == theirs[k].shape}
    report = {
        "max_abs_diff": diffs,
        "shape_mismatch": [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape],
        "only_ours": sorted(set(ours) - set(theirs)),
        "only_theirs": sorted(set(theirs) - set(ours)),
    }
    (out / f"{job['name']}.json").write_text(json.dumps(report))


def main():
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        {"logits": logits, "greedy": greedy, "nll": nll, "gguf_weights": gguf_weights,
         "build": build, "decode_logits": decode_logits}[job["kind"]](job, out)


if __name__ == "__main__":
    main()
