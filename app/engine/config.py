"""Engine configuration: a plain dataclass built once from the app's Settings.

Its defaults are the only ones: Settings' engine fields take theirs from here.
"""

from dataclasses import dataclass
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "int8"]


@dataclass(frozen=True)
class EngineConfig:
    model: str  # path of a checkpoint folder in Hugging Face format
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    dtype: Dtype = "auto"
    quantization: Quantization = "none"  # "int8": int8 decoder weights (models/quantize.py)
    block_size: int = 16
    max_num_seqs: int = 128  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (decodes + prefill chunks)
    max_model_len: int | None = None  # None: the checkpoint's own context length
    kv_cache_bytes: int | None = None  # None: a default on CPU, a memory fraction on CUDA
    gpu_memory_utilization: float = 0.85
    max_waiting_requests: int = 256  # beyond this submit() raises EngineOverloadedError
    enable_prefix_caching: bool = True
    image_cache_size: int = 256  # image embeddings kept, by content hash
    max_image_tokens_per_request: int = 0  # image placeholder tokens in one request; 0: no cap
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    max_logprobs: int = 20
    # a stream's outputs go out at most this often, joined (app/engine/pacing.py); 0: each
    # token as it comes
    stream_interval_ms: float = 5.0
    seed: int = 0
    warm_up: bool = True  # one full-size step at start-up (app/engine/warm_up.py)
    decode_mirror: bool = True  # CPU: decode attention reads app/engine/decode_mirror.py's copy
    enable_lora: bool = False  # serve LoRA adapters (models/lora) beside the model
    max_loras: int = 4  # adapter slots, when enabled
    max_lora_rank: int = 16
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT folder) loaded at start-up
