"""Reliability, tried as a user meets it: damaged and edited checkpoints, NaN/Inf weights, output
directories that cannot be written, a full disk, Ctrl-C during a save, bad flags and bad files.

Every failure must be one line on stderr that starts with "error: " (no traceback), a non-zero
exit status, and nothing half-written left on disk. The CLIs run as subprocesses (tiny models,
--method rtn where the method does not matter); the numeric-flag fuzz calls each CLI's main()
in-process, which is what the console scripts run, to stay fast.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_QUANT_CONFIGS, make_tiny_quant_checkpoint, random_hf_weights, write_text

import qoq_jax
from qoq_jax import checkpoint, fsutil
from qoq_jax.config import ConfigError, ModelConfig
from qoq_jax.hf import CheckpointError, SafetensorsCheckpoint, count_nonfinite, save_safetensors
from qoq_jax.quant.config import QuantConfig

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--calib-samples", "2", "--calib-seq-len", "32", "--clip-grid", "4"]
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


# ------------------------------------------------------------------------------------------
# helpers


def run(*args, env=None, timeout=300):
    return subprocess.run([*args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def run_all(*cmds, timeout=300):
    """Run several commands at once (independent subprocess checks; the CPUs are few, but
    each run spends most of its time importing)."""
    procs = [subprocess.Popen([*c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO) for c in cmds]
    out = []
    for c, p in zip(cmds, procs):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


def py(*args, **kw):
    return run(sys.executable, *args, **kw)


def convert_cli(*args, **kw):
    return py("-m", "qoq_jax.convert", "--quiet", *args, **kw)


def perplexity_cli(*args, **kw):
    return py("-m", "qoq_jax.eval.perplexity", "--json", *args, **kw)


def error_line(stderr: str) -> str:
    """The one line a failure prints: exactly one non-blank line, 'error: ...', no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def assert_fails(r, *fragments, code=None) -> str:
    assert r.returncode != 0, (r.stdout, r.stderr)
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    line = error_line(r.stderr)
    for f in fragments:
        assert f in line, (f, line)
    return line


def entries(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def no_partials(d: Path) -> None:
    left = [p.name for p in d.iterdir() if ".partial-" in p.name or ".probe-" in p.name]
    assert not left, left


def write_driver(path: Path, body: str) -> Path:
    """A Python script that patches something, then runs a CLI's main() as the console script
    does (sys.exit(main(argv)))."""
    path.write_text(textwrap.dedent(body))
    return path


_UNSHARE: bool | None = None


def can_mount_tmpfs(tmp: Path) -> bool:
    """Whether a private tmpfs can be mounted (unshare -rm: user + mount namespace)."""
    global _UNSHARE
    if _UNSHARE is None:
        d = tmp / "probe-mount"
        d.mkdir()
        try:
            r = subprocess.run(["unshare", "-rm", "sh", "-c",
                                'mount -t tmpfs -o size=64k tmpfs "$0"', str(d)],
                               capture_output=True, timeout=30)
            _UNSHARE = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _UNSHARE = False
        d.rmdir()
    return _UNSHARE


def in_tmpfs(mnt: Path, size: str, *cmd: str, ro: bool = False):
    """Run cmd with a fresh tmpfs of `size` mounted at mnt (private to the command); stdout
    ends with 'LEFT:<what the tmpfs holds afterwards>'."""
    mnt.mkdir(exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    script = (f'mount -t tmpfs -o {opts} tmpfs "$0" || exit 99; "$@"; rc=$?; '
              'echo "LEFT:$(ls -A "$0" | tr "\\n" " ")"; exit $rc')
    return run("unshare", "-rm", "sh", "-c", script, str(mnt), *cmd)


def left_in_tmpfs(r) -> str:
    return r.stdout.rsplit("LEFT:", 1)[1].strip()


# ------------------------------------------------------------------------------------------
# fixtures: one tiny float model, calibration text, one converted checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_quant_checkpoint(tmp_path_factory.mktemp("src") / "llama", "llama", seed=3)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt", n_words=1500)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, src, calib):
    from qoq_jax.convert import convert

    out = tmp_path_factory.mktemp("ckpt") / "rtn"
    return convert(str(src), str(out), QuantConfig(method="rtn", calib_text=[str(calib)]),
                   progress=False)


@pytest.fixture(scope="module")
def nan_src(tmp_path_factory):
    """The tiny model with one NaN in layer 1's down_proj."""
    d = make_tiny_quant_checkpoint(tmp_path_factory.mktemp("nan") / "llama", "llama", seed=3)
    cfg = ModelConfig.from_json(d)
    w = random_hf_weights(cfg, 3, std=0.05)
    w[NAN_TENSOR][5, 7] = np.nan
    save_safetensors(w, d)
    return d


def copy_ckpt(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def largest_state_file(root: Path) -> Path:
    return max((p for p in (root / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


# ------------------------------------------------------------------------------------------
# 1. verified checkpoints


def test_checkpoint_carries_checksums_of_every_state_file(ckpt):
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    assert manifest["algorithm"] == "sha256"
    state = {p.relative_to(ckpt).as_posix() for p in (ckpt / "state").rglob("*") if p.is_file()}
    assert set(manifest["files"]) == state
    assert checkpoint.verify_manifest(ckpt) is True
    model, qcfg = checkpoint.load_model(ckpt, np.float32)
    assert qcfg.method == "rtn"


def test_flipped_bytes_are_refused_naming_the_file(tmp_path, ckpt, calib):
    bad = copy_ckpt(ckpt, tmp_path / "flipped")
    f = largest_state_file(bad)
    data = bytearray(f.read_bytes())
    for i in (len(data) // 3, len(data) // 2, len(data) // 2 + 1):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    rel = f.relative_to(bad).as_posix()
    r = perplexity_cli("--model", str(bad), "--text", str(calib), "--seq-len", "16")
    assert_fails(r, f"checkpoint {bad} is damaged", rel, "sha256", code=1)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        qoq_jax.load(bad)


def test_truncated_and_missing_state_files_are_refused(tmp_path, ckpt):
    bad = copy_ckpt(ckpt, tmp_path / "truncated")
    f = largest_state_file(bad)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    rel = f.relative_to(bad).as_posix()
    with pytest.raises(CheckpointError, match=f"{rel} has {size // 2} bytes, {size} were "
                                              "written"):
        checkpoint.load_model(bad, np.float32)
    f.unlink()
    with pytest.raises(CheckpointError, match=f"{rel} is missing"):
        checkpoint.load_model(bad, np.float32)


def test_a_checkpoint_without_checksums_loads_with_a_warning(tmp_path, ckpt):
    old = copy_ckpt(ckpt, tmp_path / "old")
    (old / checkpoint.MANIFEST).unlink()
    with pytest.warns(checkpoint.CheckpointWarning, match="no checksums.json"):
        llm = qoq_jax.load(old, dtype="float32")
    assert llm.engine.kv_cache == "kv4"


def test_verification_opt_out(tmp_path, ckpt, monkeypatch):
    """verify=False and QOQ_JAX_VERIFY_CHECKPOINTS=0 skip the checksums (here: a manifest whose
    digests are wrong while the data is intact)."""
    d = copy_ckpt(ckpt, tmp_path / "optout")
    m = json.loads((d / checkpoint.MANIFEST).read_text())
    for v in m["files"].values():
        v["sha256"] = "0" * 64
    (d / checkpoint.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load_model(d, np.float32)
    checkpoint.load_model(d, np.float32, verify=False)
    monkeypatch.setenv("QOQ_JAX_VERIFY_CHECKPOINTS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qoq_jax.load(d, dtype="float32")


@pytest.mark.parametrize("fmt,detail", [
    ("g64", "'layers.mlp.down_proj.s2' is stored as int8[2, 2, 128], the config implies "
            "int8[2, 4, 128]"),
    ("per-channel", "the config implies a tensor 'layers.mlp.down_proj.scale' that is not "
                    "stored"),
])
def test_an_edited_config_is_one_clear_error(tmp_path, ckpt, calib, fmt, detail):
    d = copy_ckpt(ckpt, tmp_path / f"edited-{fmt}")
    hf = json.loads((d / "config.json").read_text())
    hf["quantization"]["weight_format"] = fmt
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(d, np.float32)
    assert f"the config.json of {d} does not match its stored state" in str(e.value)
    assert detail in str(e.value)
    if fmt == "g64":  # and as a user meets it
        r = perplexity_cli("--model", str(d), "--text", str(calib), "--seq-len", "16")
        line = assert_fails(r, "does not match its stored state", code=1)
        assert "strict" not in line


def test_a_checkpoint_with_a_nan_is_refused_naming_the_tensor(tmp_path, ckpt, monkeypatch):
    model, qcfg = checkpoint.load_model(ckpt, np.float32)
    w = model.layers.input_layernorm.weight
    w[...] = w[...].at[1, 5].set(np.inf)
    # save() refuses it ...
    with pytest.raises(CheckpointError, match="'model.layers.1.input_layernorm.weight' has 1 "
                                              r"non-finite value \(NaN/Inf\)"):
        with fsutil.atomic_directory(tmp_path / "nan") as tmp:
            checkpoint.save(model, qcfg, None, tmp)
    assert entries(tmp_path) == set()
    # ... so write one as a bug would (no check), with valid checksums: load refuses it
    monkeypatch.setattr(checkpoint, "check_finite_state", lambda pure: None)
    with fsutil.atomic_directory(tmp_path / "nan") as tmp:
        checkpoint.save(model, qcfg, None, tmp)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="'model.layers.1.input_layernorm.weight' has 1 "
                                              "non-finite value"):
        checkpoint.load_model(tmp_path / "nan", np.float32)


# ------------------------------------------------------------------------------------------
# 2. non-finite weights in float models


def test_count_nonfinite_on_every_float_dtype():
    import ml_dtypes

    for dt in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16):
        a = np.ones((4, 6), dt)
        a[0, 1], a[2, 3], a[3, 5] = np.nan, np.inf, -np.inf
        assert count_nonfinite(a) == 3, dt
        assert count_nonfinite(a[:, ::2]) == 0 and count_nonfinite(a[:, 1::2]) == 3, dt
    assert count_nonfinite(np.arange(10)) == 0


def test_a_float_model_with_a_nan_is_refused_at_load(nan_src, calib):
    with pytest.raises(CheckpointError) as e:
        qoq_jax.load(nan_src)
    assert str(e.value) == f"tensor '{NAN_TENSOR}' has 1 non-finite value (NaN/Inf)"
    SafetensorsCheckpoint(nan_src, check_finite=False)[NAN_TENSOR]  # the opt-out reads it
    r = perplexity_cli("--model", str(nan_src), "--text", str(calib), "--seq-len", "16")
    assert_fails(r, f"error: tensor '{NAN_TENSOR}' has 1 non-finite value (NaN/Inf)", code=1)


def test_conversion_refuses_a_nan_naming_the_tensor(tmp_path, nan_src, calib):
    from qoq_jax.convert import main

    args = ["--hf-dir", str(nan_src), "--calib-text", str(calib), *CALIB]
    r = convert_cli(*args, "--out", str(tmp_path / "rtn"), "--method", "rtn")
    message = f"error: tensor '{NAN_TENSOR}' has 1 non-finite value (NaN/Inf)"
    assert_fails(r, message, code=1)
    assert_main_fails(main, [*args, "--out", str(tmp_path / "qoq"), "--method", "qoq",
                             "--quiet"], message)
    assert entries(tmp_path) == set()


def make_tiny_gguf(path: Path, inf_tensor: str | None = None) -> Path:
    """A llama GGUF (float32 tensors, a placeholder vocabulary) of the tiny model."""
    import gguf

    from qoq_jax.gguf import _GLOBAL_NAMES, _LAYER_NAMES

    cfg = ModelConfig.from_hf_dict(TINY_QUANT_CONFIGS["llama"])
    weights = random_hf_weights(cfg, 0, std=0.05)
    if inf_tensor:
        weights[inf_tensor].reshape(-1)[3] = np.inf
    names = {v: k for k, v in _GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        names.update({f"model.layers.{i}.{h}.weight": f"blk.{i}.{g}.weight"
                      for g, h in _LAYER_NAMES.items()})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    for name, t in weights.items():
        w.add_tensor(names[name], t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_with_an_inf_is_refused_by_both_converters(tmp_path):
    bad = make_tiny_gguf(tmp_path / "bad.gguf", NAN_TENSOR)
    r = py("convert/gguf_to_hf.py", str(bad), str(tmp_path / "hf"), "--quiet")
    assert_fails(r, f"error: tensor '{NAN_TENSOR}' has 1 non-finite value (NaN/Inf)", code=1)
    from qoq_jax.convert import main

    assert_main_fails(main, ["--hf-dir", str(bad), "--out", str(tmp_path / "q"),
                             "--method", "rtn", "--quiet"], f"tensor '{NAN_TENSOR}'")
    assert entries(tmp_path) == {"bad.gguf"}


# ------------------------------------------------------------------------------------------
# 3. nothing half-written by convert_hf_checkpoint; --out checked before quantizing


def test_out_is_checked_before_the_model_is_even_read(tmp_path):
    """Each refusal comes first: --hf-dir names no model at all, yet the error is about --out.
    (Two as subprocesses, two through main() in-process, which is what the script runs.)"""
    from qoq_jax.convert import main

    missing = str(tmp_path / "no-model")
    link = tmp_path / "link"
    target = tmp_path / "target"
    target.mkdir()
    link.symlink_to(target)
    afile = tmp_path / "afile"
    afile.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [(link, "is a symbolic link"), (full, "already exists and is not empty")]
    runs = run_all(*[(sys.executable, "-m", "qoq_jax.convert", "--quiet", "--hf-dir", missing,
                      "--out", str(out), "--method", "rtn") for out, _ in cases])
    for (out, message), r in zip(cases, runs):
        assert_fails(r, str(out), message, code=1)
    for out, message in [(afile, "exists and is a file, not a directory"),
                         (afile / "sub", "is not a directory")]:
        assert_main_fails(main, ["--hf-dir", missing, "--out", str(out), "--quiet"], str(out),
                          message)
    assert entries(tmp_path) == {"link", "target", "afile", "full"}
    assert entries(target) == set() and entries(full) == {"keep.txt"}


def test_read_only_parent_is_refused_at_once(tmp_path):
    missing = str(tmp_path / "no-model")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            r = convert_cli("--hf-dir", missing, "--out", str(ro / "out"), "--method", "rtn")
        finally:
            ro.chmod(0o755)
        assert_fails(r, f"cannot write {ro / 'out'}: {ro} is not writable", code=1)
        assert entries(ro) == set()
        return
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("root, and no private read-only mount possible (unshare)")
    mnt = tmp_path / "ro"
    r = in_tmpfs(mnt, "64k", sys.executable, "-m", "qoq_jax.convert", "--hf-dir", missing,
                 "--out", str(mnt / "out"), "--method", "rtn", "--quiet", ro=True)
    assert_fails(r, f"{mnt} is not writable (Read-only file system)", code=1)


def test_not_enough_free_space_is_refused_before_quantizing(tmp_path, src):
    out_args = ["--hf-dir", str(src), "--method", "rtn", "--quiet"]
    if can_mount_tmpfs(tmp_path):
        mnt = tmp_path / "small"
        r = in_tmpfs(mnt, "1m", sys.executable, "-m", "qoq_jax.convert", "--out",
                     str(mnt / "out"), *out_args)
        assert left_in_tmpfs(r) == ""
    else:  # the same check, with the free space the filesystem reports replaced
        drv = write_driver(tmp_path / "drv.py", """
            import sys
            from qoq_jax import fsutil
            fsutil.free_bytes = lambda path: 1 << 20
            from qoq_jax.convert import main
            sys.exit(main(sys.argv[1:]))
            """)
        mnt = tmp_path
        r = py(str(drv), "--out", str(tmp_path / "out"), *out_args)
    line = assert_fails(r, f"not enough free space for {mnt / 'out'}: it needs about ", code=1)
    assert "MiB free in" in line or "bytes free in" in line


def test_full_disk_during_the_save_is_one_line(tmp_path, src):
    """The free-space check passes (it is told there is plenty), then the disk fills while
    Orbax writes from its background threads: one line, no tracebacks, nothing left."""
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("no private tmpfs (unshare) to fill")
    drv = write_driver(tmp_path / "drv.py", """
        import sys
        from qoq_jax import checkpoint, fsutil
        real, save = fsutil.free_bytes, checkpoint.save
        fsutil.free_bytes = lambda path: 1 << 40
        def real_disk_then_save(*a, **k):
            fsutil.free_bytes = real
            return save(*a, **k)
        checkpoint.save = real_disk_then_save
        from qoq_jax.convert import main
        sys.exit(main(sys.argv[1:]))
        """)
    mnt = tmp_path / "small"
    r = in_tmpfs(mnt, "160k", sys.executable, str(drv), "--hf-dir", str(src), "--out",
                 str(mnt / "out"), "--method", "rtn", "--quiet")
    assert_fails(r, f"error: no space left on device while writing {mnt / 'out'}: ", code=1)
    assert left_in_tmpfs(r) == ""


def test_ctrl_c_during_the_save_leaves_nothing(tmp_path, src):
    """SIGINT arrives while Orbax's background writers are busy: they are waited for, then the
    partial directory is removed."""
    drv = write_driver(tmp_path / "drv.py", """
        import os, signal, sys
        import orbax.checkpoint as ocp
        save = ocp.StandardCheckpointer.save
        def save_then_ctrl_c(self, *a, **k):
            r = save(self, *a, **k)
            os.kill(os.getpid(), signal.SIGINT)
            return r
        ocp.StandardCheckpointer.save = save_then_ctrl_c
        from qoq_jax.convert import main
        sys.exit(main(sys.argv[1:]))
        """)
    work = tmp_path / "work"
    work.mkdir()
    r = py(str(drv), "--hf-dir", str(src), "--out", str(work / "a" / "out"), "--method", "rtn",
           "--quiet")
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip() == "interrupted" and "Traceback" not in r.stderr
    assert entries(work) == set()  # no partial directory, not even the parent it created


def test_an_error_during_the_save_leaves_nothing(tmp_path, src):
    drv = write_driver(tmp_path / "drv.py", """
        import errno, sys
        from qoq_jax import checkpoint
        def broken(root):
            raise OSError(errno.EIO, "Input/output error")
        checkpoint.write_manifest = broken
        from qoq_jax.convert import main
        sys.exit(main(sys.argv[1:]))
        """)
    work = tmp_path / "work"
    work.mkdir()
    r = py(str(drv), "--hf-dir", str(src), "--out", str(work / "out"), "--method", "rtn",
           "--quiet")
    assert_fails(r, f"error: cannot write {work / 'out'}: [Errno 5] Input/output error", code=1)
    assert entries(work) == set()


def test_stale_partial_directories_are_removed_at_the_next_start(tmp_path, src):
    work = tmp_path / "work"
    work.mkdir()
    dead = work / ".out.partial-999999999-abc"  # no such process: a SIGKILLed run's
    old = work / ".out.partial-k2j4h5"  # the naming before PIDs were recorded
    live = work / f".out.partial-{os.getpid()}-xyz"  # a run in progress: left alone
    other = work / ".other.partial-999999999-abc"  # another output's
    for d in (dead, old, live, other):
        (d / "state").mkdir(parents=True)
        (d / "state" / "blob").write_bytes(b"x" * 100)
    r = convert_cli("--hf-dir", str(src), "--out", str(work / "out"), "--method", "rtn")
    assert r.returncode == 0, r.stderr
    notes = sorted(ln for ln in r.stderr.splitlines() if ln.strip())
    assert notes == [f"note: removed {d}, left by an interrupted earlier run" for d in
                     sorted((dead, old))]
    assert entries(work) == {"out", live.name, other.name}


# ------------------------------------------------------------------------------------------
# 4. one atomic-directory helper


def test_atomic_directory_helper(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with fsutil.atomic_directory(out) as tmp:
            assert tmp.parent == out.parent and tmp.name.startswith(f".out.partial-{os.getpid()}-")
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")
    assert entries(tmp_path) == set()  # the parents it created are gone too
    with fsutil.atomic_directory(out) as tmp:
        (tmp / "f").write_text("x")
    assert entries(out) == {"f"} and entries(out.parent) == {"out"}
    with pytest.raises(fsutil.OutputDirError, match="already exists and is not empty"):
        with fsutil.atomic_directory(out):
            pass
    assert not hasattr(checkpoint, "atomic_directory")  # the duplicates are gone
    import qoq_jax.gguf as gguf_mod

    assert "mkdtemp" not in Path(gguf_mod.__file__).read_text()


def test_output_name_and_error_summaries(tmp_path):
    tmp = tmp_path / f".out.partial-{os.getpid()}-abc" / "state" / "x"
    assert fsutil.output_name(tmp) == tmp_path / "out"
    e = ValueError('RESOURCE_EXHAUSTED: Failed writing: "f": No space left on device '
                   "[tensorstore_spec='{...}'] [os_error_code='28']")
    msg = str(fsutil.write_error(tmp, e))
    assert msg.startswith(f"no space left on device while writing {tmp_path / 'out'}: ")
    assert msg.endswith(" free") and "\n" not in msg


# ------------------------------------------------------------------------------------------
# 5. bad inputs of the CLIs


def assert_main_fails(main, argv, *fragments):
    """Run a CLI's main(argv) in-process as its console script would; one 'error:' line."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    assert code not in (0, None), err.getvalue()
    line = error_line(err.getvalue())
    for f in fragments:
        assert f in line, (f, line)
    return line


def test_text_files_read_with_universal_newlines(tmp_path):
    """CRLF (Botchan's line ends) and CR read as LF, as text-mode reading gives: the evaluated
    token ids, and so the perplexities of docs/ACCURACY.md, do not depend on the line-end style."""
    from qoq_jax.eval.data import load_documents

    (tmp_path / "crlf.txt").write_bytes("one\r\ntwo\rthree\n".encode())
    assert load_documents(tmp_path / "crlf.txt") == ["one\ntwo\nthree\n"]
    (tmp_path / "docs.json").write_bytes(b'["a\\r\\nb"]\r\n')
    assert load_documents(tmp_path / "docs.json") == ["a\r\nb"]  # JSON escapes are content


def test_perplexity_refuses_a_binary_text_file(tmp_path, ckpt):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    r = perplexity_cli("--model", str(ckpt), "--text", str(binary), "--seq-len", "16")
    assert_fails(r, f"{binary} is not a text file: it is not UTF-8 (byte 128 is 0x80)", code=1)
    from qoq_jax.eval.perplexity import main

    zeros = tmp_path / "zeros.txt"
    zeros.write_bytes(b"\x00" * 64)
    assert_main_fails(main, ["--model", str(ckpt), "--text", str(zeros)],
                      "is not a text file: it contains NUL bytes")
    assert_main_fails(main, ["--model", str(ckpt), "--text", str(tmp_path)],
                      "is a directory, not a text file")
    assert_main_fails(main, ["--model", str(ckpt), "--text", "wikk"],
                      "--text wikk: no such file (give 'wiki', 'botchan'")
    bad_json = tmp_path / "docs.json"
    bad_json.write_text('{"a": ')
    assert_main_fails(main, ["--model", str(ckpt), "--text", str(bad_json)],
                      f"{bad_json} is not valid JSON")


def test_convert_refuses_a_binary_or_missing_calibration_file(tmp_path, src):
    from qoq_jax.convert import main

    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"\xff\xfe" + b"text" * 10)
    out = tmp_path / "out"
    assert_main_fails(main, ["--hf-dir", str(src), "--out", str(out), "--calib-text",
                             str(binary), "--quiet"], f"{binary} is not a text file")
    assert_main_fails(main, ["--hf-dir", str(src), "--out", str(out), "--calib-text",
                             str(tmp_path / "none.txt"), "--quiet"], "no text file")
    assert_main_fails(main, ["--hf-dir", str(src), "--out", str(out), "--calib-seq-len",
                             "4096", "--quiet"],
                      "--calib-seq-len 4096 exceeds the model's context (512 tokens)")
    assert entries(tmp_path) == {"calib.bin"}


def test_a_broken_config_json_is_named(tmp_path, src, calib):
    bad = tmp_path / "badjson"
    shutil.copytree(src, bad)
    (bad / "config.json").write_text('{"hidden_size": 128,')
    r = perplexity_cli("--model", str(bad), "--text", str(calib), "--seq-len", "16")
    assert_fails(r, f"{bad / 'config.json'} is not valid JSON", code=1)
    nokey = tmp_path / "nokey"
    shutil.copytree(src, nokey)
    hf = json.loads((nokey / "config.json").read_text())
    del hf["intermediate_size"]
    (nokey / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=f"{nokey / 'config.json'}: missing the required key "
                                          "'intermediate_size'"):
        qoq_jax.load(nokey)
    hf["intermediate_size"] = "wide"
    (nokey / "config.json").write_text(json.dumps(hf))
    from qoq_jax.convert import main

    assert_main_fails(main, ["--hf-dir", str(nokey), "--out", str(tmp_path / "o"), "--quiet"],
                      "intermediate_size must be an integer, got 'wide'")
    (nokey / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        ModelConfig.from_json(nokey)
    assert not (tmp_path / "o").exists()


def test_gguf_to_hf_refuses_bad_arguments_with_one_line(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "x").write_text("x")
    r = py("convert/gguf_to_hf.py", str(tmp_path / "x.gguf"), str(out))
    assert_fails(r, f"{out} already exists and is not empty", code=1)
    sys.path.insert(0, str(REPO / "convert"))
    try:
        from gguf_to_hf import main
    finally:
        sys.path.remove(str(REPO / "convert"))
    assert_main_fails(main, [str(tmp_path / "x.gguf")],
                      "error: the following arguments are required: out")
    assert_main_fails(main, [str(tmp_path / "x.gguf"), str(tmp_path / "new")],
                      f"no GGUF file at {tmp_path / 'x.gguf'}")
    assert entries(tmp_path) == {"hf"}


FUZZ = ["0", "-1", "1e9", "nan", "abc", "2.5", "", "inf", "99999999999999999999999"]
CONVERT_FLAGS = ["--calib-samples", "--calib-seq-len", "--clip-grid", "--seed",
                 "--smooth-alpha", "--smooth-beta", "--smooth-attention-alpha", "--group-size"]
PERPLEXITY_FLAGS = ["--seq-len", "--max-windows"]


def test_fuzz_the_numeric_flags_of_convert(tmp_path):
    """Every value either is refused by the flag (naming it) or passes to the next error (no
    model here): always one 'error:' line, never a traceback."""
    from qoq_jax.convert import main

    base = ["--hf-dir", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--quiet"]
    for flag in CONVERT_FLAGS:
        for value in FUZZ:
            line = assert_main_fails(main, [*base, f"{flag}={value}"])
            assert f"argument {flag}:" in line or "no Hugging Face checkpoint" in line, line
    assert entries(tmp_path) == set()
    # what is refused, exactly
    for flag, value, message in [
            ("--calib-seq-len", "0", "must be >= 1, got 0"),
            ("--calib-samples", "-1", "must be >= 1, got -1"),
            ("--clip-grid", "0", "must be in [1, 1000], got 0"),
            ("--clip-grid", "1000000000", "must be in [1, 1000]"),
            ("--seed", "-1", "must be in [0, 4294967295], got -1"),
            ("--seed", "1e9", "'1e9' is not an integer"),
            ("--calib-samples", "2.5", "'2.5' is not an integer"),
            ("--smooth-alpha", "nan", "must be a finite number"),
            ("--smooth-beta", "1.5", "must be in [0.0, 1.0], got 1.5")]:
        assert_main_fails(main, [*base, flag, value], f"argument {flag}: {message}")
    # and end to end, as the console script prints it
    r = convert_cli("--out", str(tmp_path / "out"), "--calib-seq-len", "0")
    assert_fails(r, "error: argument --calib-seq-len: must be >= 1, got 0", code=2)


def test_fuzz_the_numeric_flags_of_perplexity(tmp_path, calib):
    from qoq_jax.eval.perplexity import main

    base = ["--model", str(tmp_path / "no-model"), "--text", str(calib)]
    for flag in PERPLEXITY_FLAGS:
        for value in FUZZ:
            line = assert_main_fails(main, [*base, f"{flag}={value}"])
            assert f"argument {flag}:" in line or "no model at" in line, line
    for flag, value, message in [("--seq-len", "0", "must be >= 2, got 0"),
                                 ("--seq-len", "1", "must be >= 2, got 1"),
                                 ("--seq-len", "-5", "must be >= 2, got -5"),
                                 ("--max-windows", "0", "must be >= 1, got 0"),
                                 ("--max-windows", "-1", "must be >= 1, got -1")]:
        assert_main_fails(main, [*base, flag, value], f"argument {flag}: {message}")
    r = perplexity_cli("--seq-len", "1")
    assert_fails(r, "error: argument --seq-len: must be >= 2, got 1", code=2)


SERVE_FLAGS = ["--header-timeout", "--keep-alive-timeout", "--body-timeout", "--drain-timeout",
               "--max-tokens-default", "--max-connections", "--max-header-bytes",
               "--max-body-bytes"]


def test_fuzz_the_limit_and_timeout_flags_of_serve(tmp_path):
    """The server's limits and timeouts (issue #30): a bad value is one line naming the flag,
    before any model is read."""
    from qoq_jax.serve import main

    base = ["--model", str(tmp_path / "no-model")]
    for flag in SERVE_FLAGS:
        for value in FUZZ:
            line = assert_main_fails(main, [*base, f"{flag}={value}"])
            assert f"argument {flag}:" in line or "no model at" in line, line
    for flag, value, message in [("--drain-timeout", "0", "must be in (0, 86400], got 0.0"),
                                 ("--body-timeout", "nan", "must be a finite number"),
                                 ("--header-timeout", "-1", "must be in (0, 86400]"),
                                 ("--max-tokens-default", "0", "must be >= 1, got 0"),
                                 ("--max-header-bytes", "100", "must be >= 1024, got 100"),
                                 ("--allowed-hosts", ",", "give at least one host name")]:
        assert_main_fails(main, [*base, flag, value], f"argument {flag}: {message}")
