"""LoRA adapters served beside their base model: many adapters on one copy of the weights.

`LoraSlots` (slots.py) is the adapter registry a loaded model gets when the server is
configured for adapters: it reads PEFT folders (adapter.py) into fixed slots of stacked A
and B matrices (projection.py) and, once a step, learns which rows of the flat batch belong
to which slot. The layers' matrix product then adds each adapter's low-rank delta to its
own rows only, so a batch of mixed adapters costs one base product plus the small ones.
"""

from models.lora.adapter import LoraLoadError
from models.lora.slots import LoraSlots, enable_lora

__all__ = ["LoraLoadError", "LoraSlots", "enable_lora"]
