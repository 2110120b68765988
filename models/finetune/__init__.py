"""LoRA fine-tuning of a checkpoint on OpenAI fine-tuning JSONL: `finetune(FinetuneConfig)`.

Trained with peft on transformers' own model classes, so the adapter folder is a
standard PEFT one; prompts go through the checkpoint's chat template the way the
server renders them, so what is trained is what is served.
"""

from models.finetune.config import FinetuneConfig
from models.finetune.data import DataError
from models.finetune.run import finetune

__all__ = ["DataError", "FinetuneConfig", "finetune"]
