"""Turns a scheduled batch into flat tensors, runs the model once and samples once.

The batch is flat: every scheduled sequence contributes its new tokens (a
prefill chunk, or one token for a decode) to one `input_ids` row. Logits are
computed only for the last token of the sequences whose prompt or decode
completes in this step, and for the prompt rows of requests that asked for
prompt logprobs (app/engine/prompt_logprobs.py). Python lists are built first and
each field becomes a tensor in one call, since on small models per-step overhead
is the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.config import EngineConfig
from app.engine.image_cache import ImageEmbeddingCache
from app.engine.prompt_logprobs import PromptRows, score_prompt_rows
from app.engine.sampling import RowLogprobs, Sampler
from app.engine.scheduler import ScheduledBatch
from app.engine.sequence import ImageInput, Sequence
from app.engine.step_threads import StepThreads
from models.attention import KVCache
from models.base import AttentionMetadata, LoadedModel, cache_slots
from models.decode_mirror import DecodeMirror


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    image_embeds: torch.Tensor | None  # [image tokens in input_ids, hidden]
    logit_rows: torch.Tensor | None  # [N] rows of the flat batch that sample; None: all of them
    sample_seqs: list[Sequence]  # whose token each logit row samples
    samples_per_seq: list[int]  # per scheduled sequence: 0, 1, or its group size at a fork
    fresh_blocks: list[int]  # blocks this step starts writing at their first slot
    prompt_rows: PromptRows = field(default_factory=PromptRows)  # rows that score prompt tokens


@dataclass
class StepResult:
    sampled: list[list[int]]  # per scheduled sequence, as Scheduler.update takes them
    logprobs: dict[int, RowLogprobs] = field(default_factory=dict)  # by seq_id
    # by seq_id: (prompt token, its logprobs) for the prompt positions this step computed
    prompt_logprobs: dict[int, list[tuple[int, RowLogprobs]]] = field(default_factory=dict)
    nonfinite_seq_ids: set[int] = field(default_factory=set)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, num_blocks: int) -> None:
        self.model = loaded.model
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

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        inputs = self.prepare(batch)
        if inputs.fresh_blocks:
            self._clear_blocks(inputs.fresh_blocks)
        self.threads.apply(inputs.input_ids.shape[0])
        hidden = self.model.forward(
            inputs.input_ids,
            inputs.positions,
            inputs.attn_metadata,
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
            positions=flat[num_tokens:],
            attn_metadata=self._attention_metadata(batch, context_lens, slots),
            image_embeds=self._image_embeds(batch),
            logit_rows=None if every_row else _long_tensor(logit_rows, self.device),
            sample_seqs=sample_seqs,
            samples_per_seq=samples_per_seq,
            fresh_blocks=fresh_blocks,
            prompt_rows=prompt_rows,
        )

    def _attention_metadata(
        self, batch: ScheduledBatch, context_lens: list[int], slots: list[int]
    ) -> AttentionMetadata:
        query_lens = batch.num_new_tokens
        seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
        width = max(len(seq.block_table) for seq in batch.seqs)
        padding = [self.padding_block] * width
        tables = [seq.block_table + padding[len(seq.block_table) :] for seq in batch.seqs]
        cu_seqlens = [0]
        for query_len in query_lens:
            cu_seqlens.append(cu_seqlens[-1] + query_len)
        ints = torch.tensor(
            [x for row in tables for x in row] + cu_seqlens + seq_lens,
            dtype=torch.int32,
            device=self.device,
        )
        num_seqs, table_size = len(query_lens), len(tables) * width
        return AttentionMetadata(
            query_start_loc=ints[table_size : table_size + num_seqs + 1],
            seq_lens=ints[table_size + num_seqs + 1 :],
            slot_mapping=_long_tensor(slots, self.device),
            block_tables=ints[:table_size].view(num_seqs, width),
            query_lens=list(query_lens),
            context_lens=context_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            seq_ids=[seq.seq_id for seq in batch.seqs],
            decode_mirror=self.decode_mirror,
        )

    # ---- images -----------------------------------------------------------------------
    def _image_embeds(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """The embedding rows of the image tokens in this step's input, in input order."""
        pieces: list[tuple[ImageInput, int, int]] = []  # (image, first row, end row)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if not seq.image_spans:
                continue
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            for span in seq.images_in(start, end):
                lo, hi = max(start, span.start) - span.start, min(end, span.end) - span.start
                pieces.append((span.image, lo, hi))
        if not pieces:
            return None
        embeddings = self._embeddings_for(pieces)
        rows = [embeddings[image.content_hash][lo:hi] for image, lo, hi in pieces]
        return rows[0] if len(rows) == 1 else torch.cat(rows)  # [image tokens, hidden]

    def _embeddings_for(self, pieces: list[tuple[ImageInput, int, int]]) -> dict[str, torch.Tensor]:
        """Cached embeddings, plus one batched vision-tower call for the images not cached.

        An image counts as a cache query when the step holds its first token (a prompt
        chunked through an image needs the same embedding again in the next step).
        """
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, ImageInput] = {}
        for image, lo, _ in pieces:
            key = image.content_hash
            if key in found or key in missing:
                continue
            cached = self.image_cache.lookup(key) if lo == 0 else self.image_cache.get(key)
            if cached is None:
                missing[key] = image
            else:
                found[key] = cached
        if missing:
            found.update(self._encode(missing))
        return found

    def _encode(self, images: dict[str, ImageInput]) -> dict[str, torch.Tensor]:
        arrays = [np.asarray(image.pixel_values, dtype=np.float32) for image in images.values()]
        pixels = torch.from_numpy(np.stack(arrays))  # [B, 3, H, W]
        pixels = pixels.to(device=self.device, dtype=self.info.dtype)
        embeds = self.model.encode_images(pixels)  # [B, image_seq_length, hidden]
        encoded = dict(zip(images, embeds, strict=True))
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
