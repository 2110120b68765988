"""`transformers serve` for image-chat checkpoints on a machine without torchvision.

    python -m bench.peers.transformers_images serve PATH --continuous-batching ...

transformers 5.25's AutoProcessor builds Qwen2-VL's, Qwen2.5-VL's and SmolVLM's
processors with their video processors, which need torchvision; PyPI's torchvision
wheels are built against the CUDA torch and do not load against the CPU torch that
mmgpt pins. This launcher registers, for those configs, the family's own processor
class less its video half (the image processor, tokenizer, chat template and
prompt expansion are unchanged), then runs transformers' own command line: the
serving, model loading and generation are transformers' code. Registration runs when
this module is the process's main, which includes the model process that
`transformers serve` spawns (it imports the parent's main module as `__mp_main__`).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

from transformers import (
    AutoProcessor,
    PretrainedConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    SmolVLMConfig,
    SmolVLMProcessor,
)


class NoVideoProcessor:
    """transformers loads the sub-processors that `__init__` names, and the keyword
    arguments its code names: Qwen-VL's own, less `video_processor`."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)  # type: ignore[call-arg]


class Qwen2VLProcessorImageOnly(NoVideoProcessor, Qwen2VLProcessor):
    pass


class Qwen2_5_VLProcessorImageOnly(NoVideoProcessor, Qwen2_5_VLProcessor):
    pass


class SmolVLMProcessorImageOnly(SmolVLMProcessor):
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_len: int = 169,
        chat_template: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, image_seq_len, chat_template, **kwargs)
        # its apply_chat_template reads the video sampling defaults even without a video
        self.video_processor = SimpleNamespace(num_frames=None, fps=None)


IMAGE_ONLY_PROCESSORS: dict[type[PretrainedConfig], type[ProcessorMixin]] = {
    Qwen2VLConfig: Qwen2VLProcessorImageOnly,
    Qwen2_5_VLConfig: Qwen2_5_VLProcessorImageOnly,
    SmolVLMConfig: SmolVLMProcessorImageOnly,
}


def register_image_only_processors() -> None:
    for config_class, processor_class in IMAGE_ONLY_PROCESSORS.items():
        AutoProcessor.register(config_class, processor_class, exist_ok=True)


if __name__ in ("__main__", "__mp_main__"):
    register_image_only_processors()


def main(argv: list[str] | None = None) -> None:
    from transformers.cli.transformers import main as transformers_main

    sys.argv = ["transformers", *(sys.argv[1:] if argv is None else argv)]
    transformers_main()


if __name__ == "__main__":
    main()
