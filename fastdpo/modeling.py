"""Models and tokenizers: loading with transformers, the shared model-option rules, and fingerprints.

The model options (--model, --revision, --dtype, --trust-remote-code, --attn-implementation,
--logps-backend) and the layout options (--packing, --prefix-sharing, --max-tokens-per-batch) are
fields of each command's own config (`fastdpo.recipes`); the functions here read them by name.
`check_scoring_options` is the rule precompute and eval share. `ModelSpec` names a model that no
command's config names (an LLM judge, the reference `fastdpo cache verify` recomputes with).

`scoring.prepare(args, device, dtype)` turns those options into a `Setup` (tokenizer, model config, attention,
layout and notes for the user), the same way for precompute, train, eval and sft. The weights hash is
a sha256 over the model's weight files (a Hub cache already names each file by its sha256, so cached
Hub models hash for free). The tokenizer hash covers what the tokenizer files define (vocabulary,
merges, normalisation, special tokens, chat template), so a tokenizer saved again by fastdpo hashes
the same as the one it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from .errors import UserError, first_line
from .io import is_local_path, sha256_file
from .quant import after_load

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
LOGPS_BACKENDS = ["auto", "triton", "torch", "eager"]

# Model types built on transformers' Llama template: `*ForCausalLM.forward` is `lm_head(backbone(...))`
# (optionally scaled or soft-capped), and the attention mask and position_ids reach every attention layer
# unchanged. Scoring (the fused head) and packing (custom masks) each rely on one of the two properties.
LLAMA_LIKE_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi3", "olmo", "olmo2", "olmo3", "cohere", "cohere2", "granite", "granitemoe", "starcoder2",
    "smollm3", "glm", "glm4", "helium", "stablelm",
})


def check_scoring_options(cfg) -> None:
    """The model options of a command that scores without training (precompute, eval)."""
    if cfg.dtype == "bf16-mixed":
        raise UserError("--dtype bf16-mixed is a training mode (fp32 weights, bf16 autocast); to score, use "
                        "bfloat16 or float32")


@dataclass
class ModelSpec:
    """What `scoring.prepare` reads, for a model outside any command's own options (an LLM judge, the reference
    `fastdpo cache verify` recomputes with). Packing, prefix sharing, max_tokens_per_batch: as the flags."""

    model: str
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    logps_backend: str = "auto"
    packing: bool | None = None
    prefix_sharing: bool | None = None
    max_tokens_per_batch: int | None = None
    load_in_4bit: bool = False  # the quantization (`fastdpo.quant`): a cache records the one it was made with
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_double_quant: bool = False
    bnb_4bit_compute_dtype: str = "bfloat16"


def set_library_progress(enabled: bool) -> None:
    """Show or hide the progress bars of datasets (tokenizing) and transformers (loading, saving weights), with
    ours: `--no-progress` is quiet."""
    import datasets
    import transformers

    if enabled:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def deepspeed_launched() -> bool:
    """`accelerate launch --config_file` with a DeepSpeed config (accelerate's ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def use_cpu() -> bool:
    """Run on CPU: no CUDA, or `accelerate launch --cpu` / ACCELERATE_USE_CPU asked for it. Under DeepSpeed, False
    even without CUDA: accelerate turns DeepSpeed off when cpu=True, and DeepSpeed picks the CPU by itself."""
    import torch

    if deepspeed_launched():
        return False
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def process_state():
    """accelerate's view of this process (rank, world size, device); gloo on CPU under torchrun or accelerate."""
    import torch
    from accelerate import PartialState

    kwargs = {}
    if deepspeed_launched() and not torch.cuda.is_available():
        # accelerate names no backend for DeepSpeed on a CPU, and without one counts every process as rank 0 of 1
        kwargs["backend"] = "gloo"
    return PartialState(cpu=use_cpu(), **kwargs)


def resolve_device(device: str = "auto"):
    import torch

    if device in (None, "auto"):
        return process_state().device
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device (try cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but CUDA is not available on this machine")
    return dev


def default_precision(dtype: str, device) -> str:
    """How a policy trains: 'auto' is bf16-mixed on a GPU (fp32 weights and optimizer, bf16 autocast: updates
    far below bf16's resolution still land) and float32 on CPU; any other value as given."""
    if dtype in (None, "auto"):
        return "bf16-mixed" if getattr(device, "type", str(device)) == "cuda" else "float32"
    return dtype


def resolve_dtype(dtype: str, device):
    """The weights' dtype: 'auto' is bf16 on a GPU and fp32 on CPU; bf16-mixed keeps fp32 weights."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    if dtype == "bf16-mixed":
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of float32, bfloat16, float16, bf16-mixed")
    return getattr(torch, DTYPES[dtype])


def _not_found(kind: str, name: str, exc: BaseException) -> UserError:
    if is_local_path(name) and not os.path.exists(name):
        return UserError(f"{kind} not found: {name} (no such directory)")
    return UserError(f"cannot load {kind} {name}: {first_line(exc)}")


def check_model_path(name: str) -> None:
    """A path-like model name must exist and be a directory (Hub ids are checked when loading)."""
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise UserError(f"model path {name} is a file; give the model's directory")
    elif is_local_path(name):
        raise UserError(f"model not found: {name} (no such directory)")


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, or hub errors
        raise _not_found("tokenizer", name, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked everywhere; any id will do
    return tok


def load_model(name: str, *, revision: str | None = None, dtype=None, device=None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, quantization=None):
    """quantization: a `BitsAndBytesConfig` (`quant.bnb_config`): the linear layers are quantized as they load, on
    `device` (default: this process's)."""
    import transformers
    from transformers import AutoModelForCausalLM

    kw = {"revision": revision, "trust_remote_code": trust_remote_code}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if quantization is not None:
        kw["quantization_config"] = quantization
        kw["device_map"] = {"": str(device or process_state().device)}  # quantized where it runs, not moved after
        device = None
    check_model_path(name)
    base = adapter_base(name)
    if base is not None:  # a LoRA run's output: its base (quantized as asked), then the adapter over it
        model = _with_context(name, base, lambda: load_model(
            base.name, revision=base.revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, quantization=quantization))
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(model, name, is_trainable=False)
        except Exception as e:
            raise UserError(f"cannot load the LoRA adapter in {name}: {first_line(e)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kw)
    except Exception as e:
        raise _not_found("model", name, e) from None
    if device is not None:
        model.to(device)
    return model if quantization is None else after_load(model)


@dataclass
class AdapterBase:
    """The model a LoRA adapter was trained over, as its adapter_config.json names it."""

    name: str  # base_model_name_or_path: a directory or a Hub id
    revision: str | None = None


def adapter_base(name: str) -> AdapterBase | None:
    """The base of the LoRA adapter in directory `name` (a LoRA run's output, which holds adapter_config.json and
    no config.json), or None for anything else. A base that is a path and is not there is a UserError."""
    path = os.path.join(name, "adapter_config.json")
    if not os.path.isfile(path) or os.path.isfile(os.path.join(name, "config.json")):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable adapter config ({first_line(e)})") from None
    base = recorded.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path} names no base model (base_model_name_or_path); set it to the base model's "
                        "directory or Hub id")
    if is_local_path(base) and not os.path.isdir(base):
        raise UserError(f"the LoRA adapter in {name} was trained over {base}, which is not there (no such "
                        f"directory); put the base model back or set base_model_name_or_path in {path}")
    return AdapterBase(base, recorded.get("revision"))


def _with_context(name: str, base: AdapterBase, load):
    """`load()`, with a failure to find the base named as the adapter's."""
    try:
        return load()
    except UserError as e:
        raise UserError(f"the LoRA adapter in {name} was trained over {base.name}, which cannot be loaded: "
                        f"{e}") from None


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    check_model_path(name)
    base = adapter_base(name)
    if base is not None:  # a LoRA run's output: its base's config
        return _with_context(name, base, lambda: load_config(base.name, base.revision, trust_remote_code))
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _not_found("model", name, e) from None


def model_dir(name: str, revision: str | None = None) -> str | None:
    """Local directory holding the model's files (a Hub snapshot for Hub ids), or None."""
    if os.path.isdir(name):
        return name
    try:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json", revision=revision, local_files_only=True,
                           _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
    return os.path.dirname(path) if path else None


def _file_sha256(path: str) -> str:
    blob = os.path.basename(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", blob):  # Hub cache blobs are named by their sha256
        return blob
    return sha256_file(path)


def weights_hash(name: str, revision: str | None = None) -> str | None:
    """sha256 over the weight files (safetensors preferred, as transformers loads them first)."""
    d = model_dir(name, revision)
    if d is None:
        return None
    files = sorted(f for f in os.listdir(d) if _WEIGHT_FILE.match(f))
    if any(f.endswith(".safetensors") for f in files):
        files = [f for f in files if f.endswith(".safetensors")]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}:{_file_sha256(os.path.join(d, f))}\n".encode())
    return h.hexdigest()


def tokenizer_hash(tok) -> str:
    """sha256 of what the tokenizer files define, independent of how they were saved."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:  # slow tokenizers
        spec = {"vocab": sorted(tok.get_vocab().items())}
    spec = {
        "backend": spec,
        "chat_template": getattr(tok, "chat_template", None),
        "special": {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "added": sorted((t, i) for t, i in tok.get_added_vocab().items()),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def machine_name(device) -> str:
    """The GPU's name, or the CPU model and core count: what a benchmark result names its machine by."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
