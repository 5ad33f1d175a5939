"""Quantized checkpoints: Orbax state of the W4A8 model, plus config and tokenizer.

Layout of a checkpoint directory:
    config.json     the Hugging Face config, plus "quantization" (the QuantConfig recipe),
                    "quantization_report" (what the pipeline chose per layer) and
                    "qoq_jax_format"
    tokenizer files as transformers' save_pretrained writes them
    state/          Orbax checkpoint of the model's NNX state (packed weights bit for bit;
                    float tensors in bfloat16)
    checksums.json  size and sha256 of every file under state/, written last
Writing is atomic (qoq_jax.fsutil.atomic_directory): everything goes to a hidden sibling
directory that is renamed into place at the end, so an interrupted or failed conversion leaves
nothing that loads as a checkpoint.

Loading verifies (verify=True, the default; QOQ_JAX_VERIFY_CHECKPOINTS=0 turns it off): every
state file against checksums.json (a checkpoint written before checksums existed loads with a
warning), the stored tensors' shapes and dtypes against what config.json implies, and that no
float tensor holds a NaN or an Inf.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qoq_jax import fsutil
from qoq_jax.config import ConfigError, ModelConfig, read_config_json
from qoq_jax.hf import CheckpointError, check_finite, count_nonfinite
from qoq_jax.quant.config import QuantConfig

FORMAT_VERSION = 1
STORAGE_DTYPE = jnp.bfloat16
MANIFEST = "checksums.json"
VERIFY_ENV = "QOQ_JAX_VERIFY_CHECKPOINTS"


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but could not be fully verified."""


def _stored_dtype(dtype):
    """Float tensors are stored in bfloat16; packed fields and fp16 scales keep their dtype."""
    if jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float16:
        return STORAGE_DTYPE
    return dtype


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and "quantization" in read_config_json(cfg)


def verify_default() -> bool:
    """The default of load_model(verify=...): on, unless QOQ_JAX_VERIFY_CHECKPOINTS is 0/false."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def linear_factory(qcfg: QuantConfig, gemm_backend: str = "auto"):
    """W4A8Linear in the recipe's weight format, with the GEMM `gemm_backend` (see W4A8Linear)."""
    import functools

    from qoq_jax.layers import W4A8Linear

    return functools.partial(W4A8Linear, weight_format=qcfg.weight_format,
                             gemm_backend=gemm_backend)


def expected_size(cfg: ModelConfig, qcfg: QuantConfig) -> int:
    """Bytes a checkpoint of this model will take at most: its stored tensors (packed 4-bit
    weights, scales, bfloat16 embeddings, norms and lm_head, counted untied since rotation
    unties them) plus 10% and 32 MiB for Orbax's metadata and the tokenizer files."""
    from qoq_jax.model import Transformer

    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    abstract = nnx.eval_shape(lambda: Transformer(untied, jnp.float32, linear_factory(qcfg)))
    _, state = nnx.split(abstract)
    raw = sum(int(np.prod(a.shape)) * np.dtype(_stored_dtype(a.dtype)).itemsize
              for a in jax.tree.leaves(nnx.to_pure_dict(state)))
    return int(raw * 1.1) + (32 << 20)


def _flat(tree, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flat(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def check_finite_state(pure) -> None:
    """Raise CheckpointError naming the first float tensor (per layer) with a NaN or an Inf."""
    from qoq_jax.model import hf_name

    for path, a in _flat(pure):
        if not count_nonfinite(a):
            continue
        a = np.asarray(a)
        for i in range(a.shape[0]) if path[0] == "layers" else ():
            check_finite(hf_name(path, i), a[i])
        check_finite(hf_name(path), a)


def _sha256(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return path.stat().st_size, digest


def _state_files(root: Path) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root / "state"):
        for name in files:
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


def _hash_all(root: Path, rels: list[str]) -> dict[str, tuple[int, str]]:
    """sha256 of many files at once (hashlib releases the GIL: threads run in parallel)."""
    workers = min(8, os.cpu_count() or 1, max(1, len(rels)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(rels, pool.map(lambda r: _sha256(root / r), rels)))


def write_manifest(root: str | os.PathLike) -> Path:
    """Write checksums.json for the state files of checkpoint directory `root`."""
    root = Path(root)
    files = {rel: {"size": size, "sha256": digest}
             for rel, (size, digest) in _hash_all(root, _state_files(root)).items()}
    out = root / MANIFEST
    out.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    return out


def verify_manifest(root: str | os.PathLike) -> bool:
    """Check every state file of checkpoint `root` against checksums.json. Returns False (and
    warns) when there is no checksums.json; raises CheckpointError naming a damaged file."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.exists():
        warnings.warn(f"{root} has no {MANIFEST} (written before checksums existed), so its "
                      f"state files cannot be verified", CheckpointWarning, stacklevel=3)
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest} is damaged ({type(e).__name__}: {e})") from None
    for rel, (size, _) in expected.items():
        f = root / rel
        if not rel.startswith("state/") or ".." in Path(rel).parts:
            raise CheckpointError(f"{manifest} is damaged (it names {rel!r})")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {root} is damaged: {rel} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {root} is damaged: {rel} has {actual} bytes, "
                                  f"{size} were written (truncated or overwritten)")
    try:
        got = _hash_all(root, list(expected))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {root}: {e}") from None
    for rel, (_, digest) in expected.items():
        if got[rel][1] != digest:
            raise CheckpointError(f"checkpoint {root} is damaged: {rel} does not match its "
                                  f"sha256 checksum (corrupted data)")
    return True


def _finish(ckptr) -> None:
    """Wait for Orbax's background writers, whatever happened (so the directory can go)."""
    import gc
    import logging

    with fsutil.defer_sigint():
        for step in (ckptr.wait_until_finished, ckptr.close):
            try:
                step()
            except BaseException:  # noqa: BLE001 - the first failure is the one reported
                pass
        # The failed writes' asyncio tasks log "Task exception was never retrieved" when they
        # are collected, possibly long after: the failure is reported once, by save().
        logging.getLogger("asyncio").addFilter(_UnretrievedTaskFilter())
        gc.collect()


class _UnretrievedTaskFilter:
    def filter(self, record) -> bool:
        return "exception was never retrieved" not in str(record.msg)


def _write_state(pure, state_dir: Path) -> None:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    # Orbax and tensorstore log failures from background threads (pages of tracebacks); the
    # captured text is replayed if the save succeeds and summarized in one line if it fails.
    with fsutil.capture_stderr() as log:
        try:
            ckptr.save(state_dir, pure)
            ckptr.wait_until_finished()
        except BaseException:
            _finish(ckptr)
            raise
        else:
            ckptr.close()
    if log and log[0]:
        sys.stderr.write(log[0])


def save(model, qcfg: QuantConfig, tokenizer, out_dir: Path, report=None) -> None:
    """Write a quantized model into out_dir (an empty directory: see fsutil.atomic_directory).

    A float tensor with a NaN or an Inf is refused before anything is written. A failed write
    raises fsutil.OutputDirError with one line (a full disk is named as such)."""
    cfg: ModelConfig = model.config
    _, state = nnx.split(model)
    pure = jax.tree.map(lambda a: a.astype(_stored_dtype(a.dtype)), nnx.to_pure_dict(state))
    check_finite_state(pure)
    out_dir = Path(out_dir)
    try:
        _write_state(pure, out_dir / "state")
        hf = cfg.to_hf_dict()
        hf["quantization"] = qcfg.to_dict()
        if report is not None:  # what the pipeline chose per layer (pipeline.QuantReport)
            hf["quantization_report"] = report.to_dict()
        hf["qoq_jax_format"] = FORMAT_VERSION
        (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        write_manifest(out_dir)  # last: a checkpoint with checksums is a complete one
    except Exception as e:
        if isinstance(e, fsutil.OutputDirError):
            raise
        if isinstance(e, OSError) or fsutil.is_disk_full(e) or _from_orbax(e):
            raise fsutil.write_error(out_dir, e) from e
        raise


def _from_orbax(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _check_stored_layout(path: Path, target) -> None:
    """The stored tensors' names, shapes and dtypes must be what config.json implies (an edited
    config, e.g. a different group size, would otherwise fail deep inside Orbax)."""
    import orbax.checkpoint as ocp

    try:
        meta = ocp.StandardCheckpointer().metadata(path / "state")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        stored = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _flat(tree)}
    except Exception:  # noqa: BLE001 - no readable metadata: the restore reports it
        return
    wanted = {p: (tuple(a.shape), np.dtype(a.dtype)) for p, a in _flat(target)}
    head = f"the config.json of {path} does not match its stored state"
    tail = "(was config.json edited? restore it, or convert the model again)"
    for p, (shape, dtype) in wanted.items():
        name = ".".join(p)
        if p not in stored:
            raise CheckpointError(f"{head}: the config implies a tensor {name!r} that is not "
                                  f"stored {tail}")
        s_shape, s_dtype = stored[p]
        if (s_shape, s_dtype) != (shape, dtype):
            raise CheckpointError(
                f"{head}: {name!r} is stored as {s_dtype.name}{list(s_shape)}, the config "
                f"implies {dtype.name}{list(shape)} {tail}")
    extra = sorted(".".join(p) for p in stored if p not in wanted)
    if extra:
        raise CheckpointError(f"{head}: tensor {extra[0]!r} is stored but the config has no "
                              f"place for it {tail}")


def load_model(path: str | os.PathLike, dtype, *, verify: bool | None = None,
               gemm_backend: str = "auto", mesh=None):
    """(model, QuantConfig) from a quantized checkpoint directory.

    verify (default: on, unless the environment sets QOQ_JAX_VERIFY_CHECKPOINTS=0): check the
    state files against checksums.json and the restored float tensors for NaN/Inf. The stored
    shapes are always checked against config.json. Failures raise CheckpointError (a
    ValueError) with one line that names the file or tensor.

    mesh (tensor parallel, see qoq_jax.sharding): Orbax restores every array straight into
    its sharded layout (each device reads its block), never whole on one device."""
    import orbax.checkpoint as ocp

    from qoq_jax.model import Transformer

    if verify is None:
        verify = verify_default()
    path = Path(path).absolute()
    config_file = path / "config.json"
    hf = read_config_json(config_file)
    if hf.get("qoq_jax_format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a qoq-jax checkpoint of format {FORMAT_VERSION}")
    try:
        cfg = ModelConfig.from_hf_dict(hf)
        if not isinstance(hf.get("quantization"), dict):
            raise ConfigError("'quantization' must be an object")
        qcfg = QuantConfig.from_dict(hf["quantization"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{config_file}: {e}") from None
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype, linear_factory(qcfg, gemm_backend)))
    graphdef, state = nnx.split(abstract)
    if mesh is None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, _stored_dtype(a.dtype)),
                              nnx.to_pure_dict(state))
    else:
        from qoq_jax import sharding

        sharding.check_tensor_parallel(abstract, sharding.tp_size(mesh))

        def sharded(kp, a):
            axes = sharding.logical_axes(tuple(sharding._key_name(k) for k in kp), len(a.shape))
            return jax.ShapeDtypeStruct(a.shape, _stored_dtype(a.dtype), sharding=(
                jax.sharding.NamedSharding(mesh, sharding.spec_for(axes))))
        target = jax.tree_util.tree_map_with_path(sharded, nnx.to_pure_dict(state))
    if not (path / "state").is_dir():
        raise CheckpointError(f"{path} has no state/ (an incomplete checkpoint?)")
    if verify:
        verify_manifest(path)
    _check_stored_layout(path, target)
    try:  # Orbax/tensorstore failures come with pages of log: one line instead
        with fsutil.capture_stderr() as log:
            restored = ocp.StandardCheckpointer().restore(path / "state", target)
    except Exception as e:  # noqa: BLE001 - tensorstore/Orbax raise many kinds
        raise CheckpointError(f"cannot read the stored state of {path}: "
                              f"{fsutil.summarize(e)}") from e
    if log and log[0]:
        sys.stderr.write(log[0])
    if verify:
        check_finite_state(restored)
    restored = jax.tree.map(
        lambda r, a: jnp.asarray(r, a.dtype), restored, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), qcfg


def build_quantized_model(cfg: ModelConfig, tensors: dict[str, np.ndarray], qcfg: QuantConfig,
                          dtype, gemm_backend: str = "auto"):
    """A W4A8 Transformer from the pipeline's named tensors."""
    from qoq_jax.model import from_hf_weights

    return from_hf_weights(cfg, tensors, dtype, linear_factory(qcfg, gemm_backend))
