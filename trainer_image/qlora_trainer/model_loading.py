"""The frozen 4-bit base model with a trainable LoRA adapter on top, and where its files come from.

An s3:// model is a folder (config.json, tokenizer files, *.safetensors) read through the run's S3
connection; pvc:// is a folder on a mounted claim; hf:// is a Hugging Face model id.
"""

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from qlora_api.spec import LoRASpec, ModelSource, QuantizationSpec, TrainingSpec
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qlora_trainer import checkpoint_prefetch
from qlora_trainer.errors import model_not_found
from qlora_trainer.phases import PhaseClock
from qlora_trainer.storage import S3Storage, S3Uri, pvc_path

log = logging.getLogger(__name__)

# Only what from_pretrained reads: a folder may also hold *.bin/*.pth duplicates or GGUF copies.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken", ".py")


@dataclass
class ModelFiles:
    path: Path  # a local folder (or an hf model id for hf://)
    revision: str  # what exactly was loaded: a commit for hf://, a content fingerprint otherwise
    hf_id: str | None = None


def fetch_model(source: ModelSource, storage: S3Storage, workdir: Path,
                before_weights: Callable[[Path], None] | None = None) -> ModelFiles:
    """The model's files in a local folder. `before_weights(folder)` runs once the small files
    (config, tokenizer, code) are there and before the weights are downloaded: a spec the model
    cannot serve fails in seconds, not after gigabytes."""
    check = before_weights or (lambda folder: None)
    if source.uri.startswith("s3://"):
        uri = S3Uri.parse(source.uri)
        objects = [o for o in storage.list_objects(uri) if o.key.endswith(_MODEL_FILE_SUFFIXES)]
        names = {o.key[len(uri.as_prefix()):] for o in objects}
        if "config.json" not in names:
            raise model_not_found(f"{source.uri} holds no config.json: not a model folder (or it does not exist); "
                                  "fix spec.model.uri")
        if not any(n.endswith(".safetensors") for n in names):
            raise model_not_found(f"{source.uri} holds no .safetensors weights; fix spec.model.uri or convert "
                                  "the model to safetensors")
        dest = workdir / "model"
        weights = [o for o in objects if o.key.endswith(".safetensors")]
        storage.download_folder(uri, dest, [o for o in objects if o not in weights])
        check(dest)
        storage.download_folder(uri, dest, weights)
        # The folder's identity without hashing gigabytes: names, sizes and ETags of its files.
        fingerprint = "\n".join(sorted(f"{o.key[len(uri.as_prefix()):]} {o.size} {o.etag}" for o in objects))
        return ModelFiles(dest, "sha256:" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16])
    if source.uri.startswith("pvc://"):
        path = pvc_path(source.uri)
        if not (path / "config.json").is_file():
            raise model_not_found(f"{source.uri} ({path}) holds no config.json; fix spec.model.uri")
        check(path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        fingerprint = "\n".join(f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
        return ModelFiles(path, "sha256:" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16])
    return _fetch_hf(source, workdir, check)


def _fetch_hf(source: ModelSource, workdir: Path, check: Callable[[Path], None]) -> ModelFiles:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo = source.uri[len("hf://"):]

    def download(suffixes: tuple[str, ...]) -> Path:
        try:
            return Path(snapshot_download(
                repo, revision=source.revision, allow_patterns=[f"*{s}" for s in suffixes],
                cache_dir=workdir / "hf-cache",
            ))
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise model_not_found(f"{source.uri} (revision {source.revision or 'main'}): {exc}; fix spec.model.uri "
                                  "or spec.model.revision (a gated model also needs a token)") from exc

    check(download(tuple(s for s in _MODEL_FILE_SUFFIXES if s != ".safetensors")))
    path = download(_MODEL_FILE_SUFFIXES)
    return ModelFiles(path, path.name, hf_id=repo)  # the snapshot folder is named by the commit


def compute_dtype(spec: QuantizationSpec) -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs; float32 on a CPU, where bf16 matmuls are slow."""
    if spec.compute_dtype != "auto":
        return getattr(torch, spec.compute_dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(spec: QuantizationSpec, sharded: bool = False) -> BitsAndBytesConfig:
    """Sharded (sharding.py), the packed 4-bit bytes are stored as the compute dtype, so FSDP2 can
    flat-shard and all-gather them as an ordinary float parameter (the bytes are the same)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(spec),
        bnb_4bit_quant_storage=compute_dtype(spec) if sharded else torch.uint8,
    )


def lora_config(spec: LoRASpec) -> LoraConfig:
    targets = "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias=spec.bias,
        task_type="CAUSAL_LM",
    )


def load_tokenizer(files: ModelFiles, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(str(files.path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding carries no labels and no attention (see data.Collator), so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_quantized_model(files: ModelFiles, source: ModelSource, quant: QuantizationSpec, training: TrainingSpec,
                         device_map=None, sharded: bool = False, phases=None):
    """The base in 4 bits, prepared for k-bit training (norms in fp32, input grads for checkpointing).
    `device_map`: where this process's copy goes (distributed.device_map: each rank its own GPU).
    `sharded`: stored for FSDP2, frozen floats left in the compute dtype (sharding.py).
    `phases`: a PhaseClock; the two steps are then timed as sub-phases of the caller's phase
    (fromPretrained: transformers builds the module tree, reads every tensor, places it and
    quantizes the linear weights; prepareKbit: the frozen floats cast to fp32, input gradients on)."""
    dtype = compute_dtype(quant)
    if device_map is None:
        device_map = {"": 0} if torch.cuda.is_available() else "cpu"
    step = (phases if phases is not None else PhaseClock()).phase  # without a run's clock: the log lines only
    with step("fromPretrained") as phase:
        kwargs = dict(quantization_config=quantization_config(quant, sharded), dtype=dtype, device_map=device_map,
                      attn_implementation="sdpa")
        loader, reason = choose_loader(files, source, device_map, sharded)
        log.info("fromPretrained: %s loader (%s)", loader, reason)
        if loader == "prefetching":
            model = load_prefetching(files.path, kwargs, device_map[""])
        else:
            model = AutoModelForCausalLM.from_pretrained(str(files.path), trust_remote_code=source.trust_remote_code,
                                                         **kwargs)
        phase.params = sum(p.numel() for p in model.parameters())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the last quantizations are queued on the GPU: their time is this step's
    # A KV cache during training would also switch off the packed-sequence masks (data.py).
    model.config.use_cache = False
    if not torch.cuda.is_available():
        _keep_cpu_4bit_differentiable(model)
    if sharded:
        from qlora_trainer.sharding import prepare_for_sharded_training

        with step("prepareSharded"):
            return prepare_for_sharded_training(model, training.gradient_checkpointing)
    with step("prepareKbit") as phase:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        # Only the parameters this step wrote (the frozen floats it casts to fp32): the 4-bit ones stay.
        phase.params = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the casts are queued on the GPU: their time is this step's
    return model


def choose_loader(files: ModelFiles, source: ModelSource, device_map, sharded: bool) -> tuple[str, str]:
    """("prefetching" or "folder", the one-line reason). The prefetching loader (checkpoint_prefetch.py)
    overlaps the checkpoint's host-to-device copies with transformers' per-parameter Python; it
    covers the plain case, and transformers' own folder load stays for the rest."""
    if not torch.cuda.is_available():
        return "folder", "no CUDA: no host-to-device copies to overlap"
    if sharded:
        return "folder", "sharded (FSDP2) storage: not covered by the prefetching loader"
    if source.trust_remote_code:
        return "folder", "remote code model: not checked with the prefetching loader"
    if not (isinstance(device_map, dict) and list(device_map) == [""]):
        return "folder", f"device_map {device_map!r} is not one device"
    if not files.path.is_dir():
        return "folder", "not a local folder"
    if any((files.path / name).exists() for name in ("adapter_config.json", "quantization_config.json")):
        return "folder", "the folder holds an adapter or quantization config"
    if not any((files.path / name).is_file()
               for name in (checkpoint_prefetch.INDEX_NAME, checkpoint_prefetch.SINGLE_NAME)):
        return "folder", "no model.safetensors or its index in the folder"
    if _config_is_quantized(files.path):
        return "folder", "a pre-quantized checkpoint (quantization_config in config.json)"
    return "prefetching", "safetensors checkpoint on one device: copies overlap transformers' Python"


def _config_is_quantized(folder: Path) -> bool:
    config = folder / "config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("quantization_config"))
    except ValueError:
        return False  # an unreadable config: the folder load reports it


def load_prefetching(folder: Path, kwargs: dict, device) -> object:
    """transformers' own from_pretrained on lazy state-dict values that a thread places ahead; what a
    folder load also reads from the folder (config, generation config, name_or_path) is set here."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(folder))
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if (folder / "generation_config.json").is_file():
        kwargs = dict(kwargs, generation_config=GenerationConfig.from_pretrained(str(folder)))
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    shards = checkpoint_prefetch.checkpoint_shards(folder)
    with checkpoint_prefetch.PrefetchedCheckpoint(shards, device) as checkpoint:
        model = model_class.from_pretrained(None, config=config, state_dict=checkpoint.state_dict(), **kwargs)
        log.info("fromPretrained: %d of %d tensors placed ahead by the prefetching thread (peak %.0f MB ahead)",
                 checkpoint.prefetched, len(shards), checkpoint.peak_outstanding / 1e6)
    model.config.name_or_path = str(folder)  # what the folder load records
    model.name_or_path = str(folder)
    return model


def _keep_cpu_4bit_differentiable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel the first
    time the layer runs in eval mode under no_grad (our eval before training), and keeps it so: that
    kernel has no backward, so the adapters below such a layer would silently get no gradient."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_adapter(model, spec: LoRASpec):
    model = get_peft_model(model, lora_config(spec))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %.2fM trainable of %.1fM parameters", spec.r, spec.alpha,
             ",".join(spec.target_modules), trainable / 1e6, total / 1e6)
    return model
