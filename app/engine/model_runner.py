"""Turns a scheduled batch into flat tensors, runs the model once and samples once.

Everything the model reads is prepared here before `forward`: token ids, positions,
the image rows, and the attention inputs with the step's plan (models/attention_inputs.py),
including, on the CPU, the decode mirror's slots (app/engine/decode_mirror.py).

The batch is flat: every scheduled sequence contributes its new tokens (a
prefill chunk, or one token for a decode) to one `input_ids` row. Logits are
computed only for the last token of the sequences whose prompt or decode
completes in this step, and for the prompt rows of requests that asked for
prompt logprobs (app/engine/prompt_logprobs.py). Python lists are built first and
each field becomes a tensor in one call, since on small models per-step overhead
is the cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.config import EngineConfig
from app.engine.decode_mirror import DecodeMirror
from app.engine.image_cache import ImageEmbeddingCache
from app.engine.kv_cache import cache_slots
from app.engine.prompt_logprobs import PromptRows, score_prompt_rows
from app.engine.sampling import RowLogprobs, Sampler
from app.engine.scheduler import ScheduledBatch
from app.engine.sequence import AdapterRef, ImageInput, ImageSpan, RopePositions, Sequence
from app.engine.step_threads import StepThreads
from models.attention import KVCache
from models.attention_inputs import AttentionInputs, MirroredDecodes, plan_attention
from models.base import BASE_ADAPTER_SLOT, AdapterSlots, LoadedModel


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_inputs: AttentionInputs
    image_embeds: torch.Tensor | None  # [image tokens in input_ids, hidden]
    logit_rows: torch.Tensor | None  # [N] rows of the flat batch that sample; None: all of them
    sample_seqs: list[Sequence]  # whose token each logit row samples
    samples_per_seq: list[int]  # per scheduled sequence: 0, 1, or its group size at a fork
    fresh_blocks: list[int]  # blocks this step starts writing at their first slot
    prompt_rows: PromptRows = field(default_factory=PromptRows)  # rows that score prompt tokens
    # per scheduled sequence: (its adapter's slot or BASE_ADAPTER_SLOT, its rows in the flat batch)
    adapter_rows: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StepResult:
    sampled: list[list[int]]  # per scheduled sequence, as Scheduler.update takes them
    logprobs: dict[int, RowLogprobs] = field(default_factory=dict)  # by seq_id
    # by seq_id: (prompt token, its logprobs) for the prompt positions this step computed
    prompt_logprobs: dict[int, list[tuple[int, RowLogprobs]]] = field(default_factory=dict)
    nonfinite_seq_ids: set[int] = field(default_factory=set)


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        num_blocks: int,
        lora: AdapterSlots | None = None,
    ) -> None:
        self.model = loaded.model
        self.lora = lora  # the model's adapter slots, when adapters are served
        self.info = loaded.info
        self.device = loaded.info.device
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        # One block more than the block manager hands out: block tables are padded with
        # it and nothing writes it, so the K/V that padded attention reads (masked) are
        # zeros. Masked or not, a NaN read there would turn every output row it meets NaN.
        self.padding_block = num_blocks
        self.kv_cache = self.model.allocate_kv_cache(num_blocks + 1, config.block_size)
        self.decode_mirror = _decode_mirror(self.kv_cache, config, self.device)
        image_token = loaded.info.image_token_id
        self.sampler = Sampler(
            self.device,
            loaded.info.eos_token_ids,
            config.seed,
            banned_token_ids=() if image_token is None else (image_token,),
        )
        self.image_cache = ImageEmbeddingCache(config.image_cache_size)
        self.threads = StepThreads(loaded.info)
        self.step_vision_seconds = 0.0  # the vision tower's time in the last step

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        self.step_vision_seconds = 0.0
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        inputs = self.prepare(batch)
        if inputs.fresh_blocks:
            self._clear_blocks(inputs.fresh_blocks)
        self.threads.apply(inputs.input_ids.shape[0])
        if self.lora is not None:
            self.lora.select(inputs.adapter_rows)
        hidden = self.model.forward(
            inputs.input_ids,
            inputs.positions,
            inputs.attn_inputs,
            self.kv_cache,
            inputs.image_embeds,
        )  # [T, hidden]
        prompt_logprobs = self._score_prompts(hidden, inputs.prompt_rows)
        if not inputs.sample_seqs:
            return StepResult([[] for _ in batch.seqs], prompt_logprobs=prompt_logprobs)
        if inputs.logit_rows is not None:
            hidden = hidden.index_select(0, inputs.logit_rows)  # [N, hidden]
        self.threads.apply_to_output(hidden.shape[0])
        row_major = self.sampler.wants_row_major(inputs.sample_seqs)
        logits = self.model.compute_logits(hidden, row_major)  # [N, vocab]
        sampled = self.sampler.sample(logits, inputs.sample_seqs)
        result = _step_result(inputs, sampled.token_ids, sampled.logprobs, sampled.nonfinite_rows)
        result.prompt_logprobs = prompt_logprobs
        return result

    def _score_prompts(
        self, hidden: torch.Tensor, plan: PromptRows
    ) -> dict[int, list[tuple[int, RowLogprobs]]]:
        if not plan.rows:
            return {}

        def logits_of(rows: torch.Tensor) -> torch.Tensor:
            self.threads.apply_to_output(rows.shape[0])
            return self.model.compute_logits(rows, row_major=True)

        return score_prompt_rows(hidden, plan, logits_of)

    def rope_positions(
        self, num_prompt_tokens: int, spans: tuple[ImageSpan, ...]
    ) -> RopePositions | None:
        """A prompt's multi-section positions, for a model that wants them (M-RoPE)."""
        if self.info.position_sections == 1:
            return None
        starts = [span.start for span in spans]
        tensors = [span.image.tensors() for span in spans]
        computed = self.model.prompt_positions(num_prompt_tokens, starts, tensors)
        if computed is None:
            return None
        prompt, offset = computed
        return RopePositions(np.ascontiguousarray(prompt, dtype=np.int64), offset)

    def clear_image_cache(self) -> None:
        """Forget every cached image embedding, and the cache's lookup counts."""
        self.image_cache.clear()

    # ---- the flat batch --------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        logit_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        samples_per_seq: list[int] = []
        fresh_blocks: list[int] = []
        prompt_rows = PromptRows()
        has_forks = False
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            prompt_rows.add(seq, start, num_new, first_row=len(token_ids))
            if num_new == 1:  # a decode, or a prompt whose other tokens were cached
                token_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(seq.block_table[start // bs] * bs + start % bs)
                if start % bs == 0:
                    fresh_blocks.append(seq.block_table[start // bs])
            else:
                token_ids += seq.token_ids[start : start + num_new]
                positions += range(start, start + num_new)
                slots += cache_slots(seq.block_table, start, start + num_new, bs)
                first_fresh = -(-start // bs) * bs
                fresh_blocks += [
                    seq.block_table[p // bs] for p in range(first_fresh, start + num_new, bs)
                ]
            context_lens.append(start)
            if start + num_new < len(seq.token_ids):
                samples_per_seq.append(0)  # a prefill chunk that does not reach the end
            elif seq.pending_forks:  # the prompt is done: sample every sample's first token
                has_forks = True
                group = [seq, *seq.pending_forks]
                logit_rows += [len(token_ids) - 1] * len(group)
                sample_seqs += group
                samples_per_seq.append(len(group))
            else:
                logit_rows.append(len(token_ids) - 1)
                sample_seqs.append(seq)
                samples_per_seq.append(1)
        num_tokens = len(token_ids)
        flat = torch.tensor(token_ids + positions, dtype=torch.int64, device=self.device)
        every_row = not has_forks and len(logit_rows) == num_tokens
        return ModelInputs(
            input_ids=flat[:num_tokens],
            positions=self._sectioned(batch, flat[num_tokens:]),
            attn_inputs=self._attention_inputs(batch, context_lens, slots),
            image_embeds=self._image_embeds(batch),
            logit_rows=None if every_row else _long_tensor(logit_rows, self.device),
            sample_seqs=sample_seqs,
            samples_per_seq=samples_per_seq,
            fresh_blocks=fresh_blocks,
            prompt_rows=prompt_rows,
            adapter_rows=_adapter_rows(batch) if self.lora is not None else [],
        )

    def _sectioned(self, batch: ScheduledBatch, positions: torch.Tensor) -> torch.Tensor:
        """[T] positions, or [sections, T] for a model with multi-section positions: a
        sequence's own where its prompt has them, the 1-D ones in every section elsewhere."""
        sections = self.info.position_sections
        if sections == 1:
            return positions
        if not any(seq.rope_positions is not None for seq in batch.seqs):
            return positions.expand(sections, -1)
        rows = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            if seq.rope_positions is None:
                rows.append(np.broadcast_to(np.arange(start, start + num_new), (sections, num_new)))
            else:
                rows.append(seq.rope_positions.columns(start, start + num_new))
        return torch.from_numpy(np.concatenate(rows, axis=1)).to(self.device)  # [sections, T]

    def _attention_inputs(
        self, batch: ScheduledBatch, context_lens: list[int], slots: list[int]
    ) -> AttentionInputs:
        tables = [seq.block_table for seq in batch.seqs]
        return plan_attention(
            list(batch.num_new_tokens),
            context_lens,
            tables,
            _long_tensor(slots, self.device),
            self.block_size,
            self.padding_block,
            self._mirrored_decodes(batch, context_lens, tables),
            self.info.sliding_window,
        )

    def _mirrored_decodes(
        self, batch: ScheduledBatch, context_lens: list[int], tables: list[list[int]]
    ) -> MirroredDecodes | None:
        if self.decode_mirror is None:
            return None
        decodes = [i for i, num_new in enumerate(batch.num_new_tokens) if num_new == 1]
        seq_ids = [seq.seq_id for seq in batch.seqs]
        return self.decode_mirror.prepare(seq_ids, context_lens, tables, decodes)

    # ---- images -----------------------------------------------------------------------
    def _image_embeds(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """The embedding rows of the image tokens in this step's input, in input order."""
        pieces: list[ImagePiece] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if not seq.image_spans:
                continue
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            adapter = seq.adapter if seq.adapter is not None and seq.adapter.adapts_images else None
            for span in seq.images_in(start, end):
                lo, hi = max(start, span.start) - span.start, min(end, span.end) - span.start
                pieces.append(ImagePiece(span.image, *span.rows(lo, hi), adapter))
        if not pieces:
            return None
        embeddings = self._embeddings_for(pieces)
        rows = [embeddings[piece.key][piece.lo : piece.hi] for piece in pieces]
        return rows[0] if len(rows) == 1 else torch.cat(rows)  # [image tokens, hidden]

    def _embeddings_for(self, pieces: list[ImagePiece]) -> dict[str, torch.Tensor]:
        """Cached embeddings, plus one batched vision-tower call for the images not cached
        (one per adapter that changes image embeddings).

        An image counts as a cache query when the step holds its first token (a prompt
        chunked through an image needs the same embedding again in the next step).
        """
        found: dict[str, torch.Tensor] = {}
        missing: dict[int, dict[str, ImageInput]] = {}  # by adapter slot
        for piece in pieces:
            key = piece.key
            if key in found or any(key in images for images in missing.values()):
                continue
            cached = self.image_cache.lookup(key) if piece.lo == 0 else self.image_cache.get(key)
            if cached is None:
                missing.setdefault(piece.slot, {})[key] = piece.image
            else:
                found[key] = cached
        for slot, images in missing.items():
            found.update(self._encode(images, slot))
        return found

    def _encode(self, images: dict[str, ImageInput], slot: int) -> dict[str, torch.Tensor]:
        """New images of the step under one adapter slot in one packed call of the tower."""
        started = time.perf_counter()
        if self.lora is not None:
            self.lora.select_all(slot)
        embeds = self.model.encode_image_batch([_torch_tensors(image) for image in images.values()])
        self.step_vision_seconds += time.perf_counter() - started
        encoded = dict(zip(images, embeds, strict=True))  # each [its tokens, hidden]
        for content_hash, embedding in encoded.items():
            self.image_cache.put(content_hash, embedding)
        return encoded

    # ---- block contents ----------------------------------------------------------------
    def _clear_blocks(self, block_ids: list[int]) -> None:
        """Zero blocks before their first token is written. Attention reads a block's slots
        past its sequence's end (masked); what a freed block held must not be NaN there."""
        ids = _long_tensor(block_ids, self.device)
        for k_cache, v_cache in self.kv_cache:
            k_cache.index_fill_(0, ids, 0.0)
            v_cache.index_fill_(0, ids, 0.0)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = _long_tensor([s for s, _ in copies], self.device)
        dst = _long_tensor([d for _, d in copies], self.device)
        for k_cache, v_cache in self.kv_cache:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))


@dataclass(frozen=True)
class ImagePiece:
    """The rows [lo, hi) of one image's embedding that this step's input holds."""

    image: ImageInput
    lo: int
    hi: int
    adapter: AdapterRef | None  # an adapter that changes image embeddings, or None

    @property
    def key(self) -> str:
        """The image cache key: the content hash, and the adapter's load where it matters."""
        if self.adapter is None:
            return self.image.content_hash
        return f"{self.image.content_hash}@lora{self.adapter.load_id}"

    @property
    def slot(self) -> int:
        return BASE_ADAPTER_SLOT if self.adapter is None else self.adapter.slot


def _adapter_rows(batch: ScheduledBatch) -> list[tuple[int, int]]:
    return [
        (BASE_ADAPTER_SLOT if seq.adapter is None else seq.adapter.slot, num_new)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True)
    ]


def _torch_tensors(image: ImageInput) -> dict[str, torch.Tensor]:
    """The processor's arrays as tensors; pixel values as float32, the model casts them."""
    tensors = {name: torch.from_numpy(np.asarray(array)) for name, array in image.extra.items()}
    pixels = np.asarray(image.pixel_values, dtype=np.float32)
    return {"pixel_values": torch.from_numpy(pixels), **tensors}


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _step_result(
    inputs: ModelInputs,
    token_ids: list[int],
    logprobs: list[RowLogprobs | None],
    nonfinite_rows: list[int],
) -> StepResult:
    sampled: list[list[int]] = []
    row = 0
    for count in inputs.samples_per_seq:
        sampled.append(token_ids[row : row + count])
        row += count
    result = StepResult(sampled)
    for seq, row_logprobs in zip(inputs.sample_seqs, logprobs, strict=True):
        if row_logprobs is not None:
            result.logprobs[seq.seq_id] = row_logprobs
    result.nonfinite_seq_ids = {inputs.sample_seqs[i].seq_id for i in nonfinite_rows}
    return result


def _decode_mirror(
    kv_cache: list[KVCache], config: EngineConfig, device: torch.device
) -> DecodeMirror | None:
    """On the CPU, decode attention reads a contiguous copy of the decoding sequences' K/V,
    at most as big as the paged cache itself."""
    if not config.decode_mirror or device.type != "cpu":
        return None
    return DecodeMirror(kv_cache, budget_bytes=sum(k.nbytes + v.nbytes for k, v in kv_cache))
