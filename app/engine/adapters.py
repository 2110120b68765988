"""The LoRA adapters an engine serves: names, slots, requests in flight, unloading.

Owned by the loop thread. Each load gets a new `load_id` that keys the prefix and image
caches, so a name loaded again from other weights never meets the old entries. An adapter
unloaded while requests use it leaves the name at once (new requests get a 404) and keeps
its slot until the last of them ends.
"""

from __future__ import annotations

import itertools

from app.engine.errors import AdapterLoadError, AdapterNotFoundError
from app.engine.sequence import AdapterRef
from models import LoraLoadError
from models.base import AdapterSlots


class AdapterTable:
    def __init__(self, slots: AdapterSlots | None) -> None:
        self._slots = slots
        self._active: dict[str, AdapterRef] = {}  # by name
        self._draining: dict[int, AdapterRef] = {}  # unloaded, by load_id, until idle
        self._in_flight: dict[int, int] = {}  # load_id -> unfinished requests
        self._load_ids = itertools.count(1)

    @property
    def names(self) -> list[str]:
        return list(self._active)

    def serving(self) -> list[AdapterRef]:
        """Every adapter with a slot: the active ones, then those draining."""
        return [*self._active.values(), *self._draining.values()]

    def load(self, name: str, path: str) -> AdapterRef:
        if self._slots is None:
            raise AdapterLoadError(
                "LoRA adapters are off: start the server with --lora-modules or with "
                "runtime adapter loading allowed"
            )
        if name in self._active:
            raise AdapterLoadError(f"an adapter named {name!r} is already loaded")
        try:
            loaded = self._slots.load(path)
        except LoraLoadError as exc:
            raise AdapterLoadError(str(exc)) from exc
        ref = AdapterRef(name, loaded.slot, next(self._load_ids), loaded.adapts_images)
        self._active[name] = ref
        return ref

    def unload(self, name: str) -> None:
        ref = self._active.pop(name, None)
        if ref is None:
            raise AdapterNotFoundError(f"no LoRA adapter named {name!r} is loaded")
        self._draining[ref.load_id] = ref
        self._free_if_idle(ref)

    def acquire(self, name: str) -> AdapterRef:
        """The adapter a new request uses; counted until `release`."""
        ref = self._active.get(name)
        if ref is None:
            raise AdapterNotFoundError(f"The model {name!r} does not exist.")
        self._in_flight[ref.load_id] = self._in_flight.get(ref.load_id, 0) + 1
        return ref

    def release(self, ref: AdapterRef) -> None:
        self._in_flight[ref.load_id] -= 1
        self._free_if_idle(ref)

    def _free_if_idle(self, ref: AdapterRef) -> None:
        if self._in_flight.get(ref.load_id, 0) or ref.load_id not in self._draining:
            return
        del self._draining[ref.load_id]
        self._in_flight.pop(ref.load_id, None)
        assert self._slots is not None
        self._slots.unload(ref.slot)
