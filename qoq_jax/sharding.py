"""Tensor parallelism: the device mesh and the rules that shard the model over it.

Megatron-style, over one mesh axis ``"tp"``:

- column-parallel (output features split): q/k/v_proj (by attention / KV head) and
  gate/up_proj (by intermediate channel); their biases and quantization scales follow N;
- row-parallel (input features split): o_proj and down_proj. Their partial products are summed
  with one all-reduce (``psum``) each: one per attention block, one per MLP. W4 weights split K
  on group boundaries (g128/g64: the [groups, N] scales split with it; per-channel: the [N]
  scales are replicated and each shard corrects the zero point with its own row sums);
- the KV cache pools split by KV head (codes, scales and zeros alike); the page table is
  replicated, so the host-side allocator and the scheduler are unchanged;
- embeddings and lm_head split over the vocabulary (a lookup is a masked take + psum; logits
  leave the shard_map split over the vocabulary and XLA's SPMD partitioner samples from them).

Every parameter gets *logical* axis names from its path (``logical_axes``), and
``LOGICAL_AXIS_RULES`` maps logical names to mesh axes, as Flax's logical partitioning and
MaxText do; change a rule here and the whole model follows. The forward pass runs per device
under ``jax.shard_map`` (model.forward(mesh=...)), so every Pallas kernel sees its local shard.

KV heads are never replicated: a model whose KV-head count is not a multiple of the
tensor-parallel size is refused (``check_tensor_parallel``) with a message that says which
sizes work.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "tp"

# logical axis -> mesh axis (None: replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("vocab", AXIS),
    ("embed", None),
    ("heads", AXIS),
    ("kv_heads", AXIS),
    ("mlp", AXIS),
    # mixture of experts: every device holds every expert, its slice of F (as a dense MLP);
    # expert parallelism would map this to a mesh axis
    ("experts", None),
)

# projection -> logical name of its split dimension (N for column-, K for row-parallel)
COLUMN_PARALLEL = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads",
                   "gate_proj": "mlp", "up_proj": "mlp",
                   # the runtime's fused projections (model.fuse_projections), shard-major
                   "qkv_proj": "heads", "gate_up_proj": "mlp"}
ROW_PARALLEL = {"o_proj": "heads", "down_proj": "mlp"}

# KV cache pools: [L, num_pages, Hkv, page_size, ...] for every array of both cache kinds
CACHE_AXES = ("layers", None, "kv_heads")


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at `path` (an NNX state path, e.g. ('layers',
    'self_attn', 'q_proj', 'qweight')) with `ndim` dimensions."""
    path = tuple(str(p) for p in path if str(p) != "value")
    lead = ("layers",) if path[0] == "layers" else ()
    if "experts" in path:  # stacked experts [E, N, K]: the expert axis, then as a projection
        lead = lead + ("experts",)
    name, module = path[-1], (path[-2] if len(path) >= 2 else "")
    rank = ndim - len(lead)
    if module == "gate" and path[-3:-2] == ("mlp",):  # an MoE's router [E, D]: replicated
        axes = ("experts", "embed")
    elif module in ("embed_tokens", "lm_head"):
        axes = ("vocab", "embed")
    elif module in COLUMN_PARALLEL or module in ROW_PARALLEL:
        out, inp = ((COLUMN_PARALLEL[module], "embed") if module in COLUMN_PARALLEL
                    else ("embed", ROW_PARALLEL[module]))
        if rank == 2 and name in ("s2", "szero"):  # progressive-group scales [groups, N]
            axes = (inp, out)
        elif rank == 2:  # weight [N, K], qweight [N, K/2], int8_weight [N, K]
            axes = (out, inp)
        else:  # bias, per-channel scale/szero, s1: [N]
            axes = (out,)
    elif name == "key_scale":  # [Hkv, D]: with its KV heads
        axes = ("kv_heads", None)
    else:  # norms
        axes = ("embed",) * rank
    if len(axes) != rank:
        raise ValueError(f"no sharding rule for {'.'.join(path)} of rank {ndim}")
    return lead + axes


def spec_for(axes, rules=LOGICAL_AXIS_RULES) -> P:
    table = dict(rules)
    return P(*(table.get(a) if a is not None else None for a in axes))


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def state_specs(state) -> list[P]:
    """PartitionSpecs of the leaves of an NNX state (in jax.tree.leaves order)."""
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        path = tuple(_key_name(k) for k in kp)
        out.append(spec_for(logical_axes(path, len(leaf.shape))))
    return out


def cache_specs(cache):
    """PartitionSpecs of a KV cache (16-bit or KV4): every pool split by KV head."""
    spec = spec_for(CACHE_AXES)
    return jax.tree.map(lambda _: spec, cache)


def tp_size(mesh) -> int:
    return 1 if mesh is None else int(dict(mesh.shape).get(AXIS, 1))


def make_mesh(tensor_parallel: int, devices=None) -> Mesh | None:
    """A 1-D mesh of the first `tensor_parallel` devices (all processes' devices, in order);
    None for tensor_parallel == 1 (the single-device path, unchanged)."""
    n = int(tensor_parallel)
    if n < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel!r}")
    if n == 1:
        return None
    devices = list(jax.devices() if devices is None else devices)
    if n > len(devices):
        hint = ("; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices"
                if devices[0].platform == "cpu" else "")
        raise ValueError(f"--tensor-parallel {n} needs {n} devices, but only {len(devices)} "
                         f"are visible ({devices[0].platform}){hint}")
    return Mesh(np.array(devices[:n]), (AXIS,))


def check_tensor_parallel(model, tp: int) -> None:
    """Raise ValueError if `model` cannot be split `tp` ways, naming what does not divide."""
    if tp == 1:
        return
    from flax import nnx

    from qoq_jax.layers import W4A8Linear

    cfg = model.config
    problems = []
    mlp = cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("intermediate size", mlp), ("vocabulary", cfg.vocab_size)):
        if n % tp:
            problems.append(f"{n} {what}")
    if cfg.num_kv_heads % tp:
        sizes = [d for d in range(1, cfg.num_kv_heads + 1)
                 if cfg.num_kv_heads % d == 0 and cfg.num_heads % d == 0
                 and mlp % d == 0 and cfg.vocab_size % d == 0]
        raise ValueError(
            f"--tensor-parallel {tp} does not divide the model's {cfg.num_kv_heads} KV heads "
            f"(KV heads are split across devices, never replicated); tensor-parallel sizes "
            f"this model supports: {', '.join(map(str, sizes))}")
    if problems:
        raise ValueError(f"--tensor-parallel {tp} does not divide the model's "
                         f"{', '.join(problems)}")
    for path, lin in nnx.iter_graph(model):
        if not isinstance(lin, W4A8Linear) or not path:
            continue
        name = str(path[-1])
        n, k = lin.out_features, lin.in_features
        if name in COLUMN_PARALLEL and (n // tp) % 64:
            raise ValueError(f"--tensor-parallel {tp}: {name} has {n} outputs; the W4A8 GEMM "
                             f"needs a multiple of 64 per device, not {n // tp}")
        if name in ROW_PARALLEL:
            g = lin.weight_format.group_size if lin.weight_format.is_group else 64
            if (k // tp) % g:
                raise ValueError(f"--tensor-parallel {tp}: {name}'s {k} inputs split into "
                                 f"{k // tp} per device, not a multiple of the "
                                 f"{'group size ' if lin.weight_format.is_group else ''}{g}")


def shard_state(state, mesh: Mesh):
    """Place an NNX state on the mesh by the rules (a host or single-device state)."""
    specs = state_specs(state)
    leaves, treedef = jax.tree.flatten(state)
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)]
    return jax.tree.unflatten(treedef, placed)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def cache_sharding(mesh: Mesh, cache):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache))
