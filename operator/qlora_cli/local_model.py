"""The job's base model and its published adapter, loaded on this machine for `try` and `eval`.

The base comes from where the job read it (an s3:// folder through the job's S3 settings, or a
Hugging Face id at its revision) unless --base names a local folder; the adapter is fetched and
verified like `qlora fetch` does, into a cache keyed by the manifest's digest. By default the base is
quantized as the trainer quantized it (the spec's NF4 settings), so eval losses match the trainer's.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import click

from qlora_cli.fetch import fetch_adapter, published_result
from qlora_cli.s3 import s3_client, s3_errors, split_uri

CACHE = Path.home() / ".cache" / "qlora"


@dataclass
class LoadedAdapter:
    model: object  # a peft PeftModel: model.disable_adapter() gives the base
    tokenizer: object
    device: str
    compute_dtype: object


def base_model_path(job: dict, s3, base: str | None) -> str:
    if base:
        return base
    uri = job["spec"]["model"]["uri"]
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://")
    if uri.startswith("s3://"):
        bucket, prefix = split_uri(uri.rstrip("/") + "/")
        dest = CACHE / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o for page in pages for o in page.get("Contents", [])]
        if not keys:
            raise click.ClickException(f"{uri} holds no files")
        for obj in keys:
            target = dest / obj["Key"][len(prefix):]
            if target.is_file() and target.stat().st_size == obj["Size"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
        return str(dest)
    raise click.ClickException(f"{uri} is not reachable from here: pass --base with a local copy of the model")


def adapter_path(job: dict, s3, adapter: Path | None) -> Path:
    if adapter:
        return adapter
    result = published_result(job)
    meta = job["metadata"]
    dest = CACHE / "adapters" / meta.get("namespace", "default") / meta["name"] / str(result.get("manifestSha256"))[:16]
    if not (dest / "manifest.json").is_file():
        fetch_adapter(s3, result, dest)
    return dest


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(job: dict, s3_options, base: str | None, adapter: Path | None, device: str, quantize: bool) -> LoadedAdapter:
    try:
        import torch
        from peft import PeftModel
        from qlora_api.spec import QuantizationSpec
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise click.ClickException(f"`try` and `eval` need the trainer's libraries: pip install "
                                   f"'qlora-operator[trainer]' ({exc})") from exc
    s3 = s3_client(job["spec"]["output"], s3_options)
    with s3_errors("fetching the base model and the adapter"):
        base_path, adapter_dir = base_model_path(job, s3, base), adapter_path(job, s3, adapter)
    quant = QuantizationSpec.model_validate(job["spec"].get("quantization") or {})
    device = pick_device(device)
    dtype = getattr(torch, quant.compute_dtype) if quant.compute_dtype != "auto" else (
        torch.bfloat16 if device == "cuda" else torch.float32)
    kwargs = {"dtype": dtype, "device_map": {"": device},
              "revision": job["spec"]["model"].get("revision") if base is None else None,
              "trust_remote_code": job["spec"]["model"].get("trustRemoteCode", False)}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))  # the trainer published the tokenizer it used
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if quantize and device == "cpu":
        _same_cpu_kernels_as_the_trainer(model)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return LoadedAdapter(model, tokenizer, device, dtype)


def _same_cpu_kernels_as_the_trainer(model) -> None:
    """The trainer turns off bitsandbytes' repacked AVX512-BF16 CPU kernel (it has no backward);
    its eval loss came from the plain kernel, so the comparison here uses that one too."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
