"""Every Prometheus collector of mmgpt, named in one place, and the one module that writes them.

The engine hands its stats to an `EngineStatsRecorder`; the HTTP gate, the routes, the
image intake and the service call the `record_*` functions below. No other module
touches a collector. Labels stay low-cardinality: routes are templates, never raw paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, Info

from app.engine.stats import EngineStats, FinishedRequestStats, StatsUpdate, StepStats
from app.errors import failure_reason

if TYPE_CHECKING:
    from app.config import Settings
    from models.base import ModelInfo

# Buckets that resolve GPU speeds (ms) and CPU speeds (tens of ms per token).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

TIME_TO_FIRST_TOKEN = Histogram(
    "mmgpt_time_to_first_token_seconds", "Arrival to first output token.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
INTER_TOKEN_LATENCY = Histogram(
    "mmgpt_inter_token_latency_seconds", "Time between consecutive output tokens of a request.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
E2E_REQUEST_LATENCY = Histogram(
    "mmgpt_e2e_request_latency_seconds", "Arrival to last output token.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
REQUEST_QUEUE_TIME = Histogram(
    "mmgpt_request_queue_time_seconds", "Arrival to first scheduled step.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
REQUEST_PREFILL_TIME = Histogram(
    "mmgpt_request_prefill_time_seconds", "First scheduled step to first output token.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
REQUEST_DECODE_TIME = Histogram(
    "mmgpt_request_decode_time_seconds", "First output token to last output token.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
IMAGE_PREPROCESS_TIME = Histogram(
    "mmgpt_image_preprocess_seconds", "Decoding and preprocessing of one image.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
ENGINE_STEP_TIME = Histogram(
    "mmgpt_engine_step_seconds", "Duration of one engine step (schedule, run, update).",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
BATCH_TOKENS = Histogram(
    "mmgpt_batch_tokens", "Tokens computed in one engine step.", buckets=TOKEN_BUCKETS
)
REQUEST_PROMPT_TOKENS = Histogram(
    "mmgpt_request_prompt_tokens", "Prompt tokens per request.", buckets=TOKEN_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "mmgpt_request_generation_tokens", "Generated tokens per request.", buckets=TOKEN_BUCKETS
)

REQUEST_IMAGE_TOKENS = Histogram(
    "mmgpt_request_image_tokens",
    "Image placeholder tokens per request that holds images.",
    buckets=TOKEN_BUCKETS,
)
VISION_ENCODER_TIME = Histogram(
    "mmgpt_vision_encoder_seconds",
    "The vision tower's time in one engine step that encoded images.",
)
NUM_REQUESTS_RUNNING = Gauge("mmgpt_num_requests_running", "Requests in the running queue.")
NUM_REQUESTS_WAITING = Gauge("mmgpt_num_requests_waiting", "Requests in the waiting queue.")
ADAPTER_REQUESTS_RUNNING = Gauge(
    "mmgpt_lora_requests_running", "Running sequences per LoRA adapter.", ["adapter"]
)
ADAPTER_REQUESTS_WAITING = Gauge(
    "mmgpt_lora_requests_waiting", "Waiting sequences per LoRA adapter.", ["adapter"]
)
KV_CACHE_USAGE = Gauge(
    "mmgpt_kv_cache_usage_ratio", "KV blocks held by live requests over all blocks."
)
DECODE_MIRROR_BYTES = Gauge(
    "mmgpt_decode_mirror_bytes",
    "Memory the decode mirror holds: contiguous K/V of decoding sequences (CPU only).",
)

PROMPT_TOKENS = Counter("mmgpt_prompt_tokens", "Prompt tokens of finished requests.")
GENERATION_TOKENS = Counter("mmgpt_generation_tokens", "Generated tokens.")
REQUEST_SUCCESS = Counter(
    "mmgpt_request_success", "Requests that finished.", ["endpoint", "finished_reason"]
)
REQUEST_FAILURE = Counter(
    "mmgpt_request_failure", "Requests that failed, by reason.", ["endpoint", "reason"]
)
PREFIX_CACHE_QUERIES = Counter(
    "mmgpt_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
)
PREFIX_CACHE_HITS = Counter("mmgpt_prefix_cache_hits", "Prompt tokens found in the prefix cache.")
IMAGE_CACHE_QUERIES = Counter("mmgpt_image_cache_queries", "Images looked up in the image cache.")
IMAGE_CACHE_HITS = Counter("mmgpt_image_cache_hits", "Images found in the image cache.")
IMAGES = Counter("mmgpt_images", "Images received in requests.")
NUM_PREEMPTIONS = Counter("mmgpt_num_preemptions", "Sequences preempted for lack of KV blocks.")
HTTP_REQUESTS = Counter("mmgpt_http_requests", "HTTP requests by route template and status.",
                        ["route", "status"])  # fmt: skip

MODEL_INFO = Info("mmgpt_model", "The model being served.")

FAILURE_REASONS = (
    "validation", "unsupported_media", "too_large", "unauthorized", "overloaded",
    "client_disconnect", "internal", "not_found", "not_ready",
)  # fmt: skip

# The routes that generate, by template, and the endpoint label each one counts under.
GENERATING_ROUTES = {
    "/v1/completions": "completions",
    "/v1/engines/{engine}/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/caption": "caption",
    "/v1/qa": "qa",
}
# The engine's cumulative counts, in the order `_cumulative` reads them.
CUMULATIVE_COUNTERS = (
    PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, IMAGE_CACHE_QUERIES, IMAGE_CACHE_HITS,
    NUM_PREEMPTIONS,
)  # fmt: skip


class EngineStatsRecorder:
    """Turns one engine's stats updates into series: the sink `AsyncEngine` is given."""

    def __init__(self) -> None:
        self._counted = (0,) * len(CUMULATIVE_COUNTERS)  # the counts already added
        self._adapters: set[str] = set()  # the adapter labels set so far

    def record(self, update: StatsUpdate) -> None:
        _set_gauges(update.engine)
        self._set_adapter_gauges(update.engine)
        self._add_growth(update.engine)
        if update.step is not None:
            _observe_step(update.step)
        for request in update.finished:
            _observe_finished(request)

    def _set_adapter_gauges(self, stats: EngineStats) -> None:
        """One series per adapter holding a slot; an unloaded adapter's series go away."""
        current = set()
        for name, running, waiting in stats.adapter_requests:
            ADAPTER_REQUESTS_RUNNING.labels(name).set(running)
            ADAPTER_REQUESTS_WAITING.labels(name).set(waiting)
            current.add(name)
        for gone in self._adapters - current:
            ADAPTER_REQUESTS_RUNNING.remove(gone)
            ADAPTER_REQUESTS_WAITING.remove(gone)
        self._adapters = current

    def _add_growth(self, stats: EngineStats) -> None:
        """The engine counts from its start; a counter takes only what is new."""
        current = _cumulative(stats)
        for counter, now, before in zip(CUMULATIVE_COUNTERS, current, self._counted, strict=True):
            if now > before:
                counter.inc(now - before)
        self._counted = current


def _cumulative(stats: EngineStats) -> tuple[int, ...]:
    return (
        stats.prefix_cache_queries, stats.prefix_cache_hits, stats.image_cache_queries,
        stats.image_cache_hits, stats.num_preemptions,
    )  # fmt: skip


def _set_gauges(stats: EngineStats) -> None:
    NUM_REQUESTS_RUNNING.set(stats.num_running)
    NUM_REQUESTS_WAITING.set(stats.num_waiting)
    KV_CACHE_USAGE.set(stats.kv_cache_usage)
    DECODE_MIRROR_BYTES.set(stats.decode_mirror_bytes)


def _observe_step(step: StepStats) -> None:
    ENGINE_STEP_TIME.observe(step.duration)
    BATCH_TOKENS.observe(step.num_batched_tokens)
    GENERATION_TOKENS.inc(step.num_generated_tokens)
    if step.vision_encoder_seconds > 0:
        VISION_ENCODER_TIME.observe(step.vision_encoder_seconds)


def _observe_finished(request: FinishedRequestStats) -> None:
    PROMPT_TOKENS.inc(request.num_prompt_tokens)
    REQUEST_PROMPT_TOKENS.observe(request.num_prompt_tokens)
    REQUEST_GENERATION_TOKENS.observe(request.num_generation_tokens)
    if request.num_image_tokens:
        REQUEST_IMAGE_TOKENS.observe(request.num_image_tokens)
    E2E_REQUEST_LATENCY.observe(request.e2e_latency)
    spans = (
        (REQUEST_QUEUE_TIME, request.queue_time),
        (TIME_TO_FIRST_TOKEN, request.time_to_first_token),
        (REQUEST_PREFILL_TIME, request.prefill_time),
        (REQUEST_DECODE_TIME, request.decode_time),
    )
    for histogram, seconds in spans:
        if seconds is not None:
            histogram.observe(seconds)
    for gap in request.token_gaps:
        INTER_TOKEN_LATENCY.observe(gap)


def record_http_request(route: str, status: int, code: str | None = None) -> None:
    """One HTTP request's end, by route template; a refused generation also by reason."""
    HTTP_REQUESTS.labels(route, str(status)).inc()
    endpoint = GENERATING_ROUTES.get(route)
    reason = failure_reason(status, code)
    if endpoint is not None and reason is not None:
        record_request_failure(endpoint, reason)


def record_request_success(endpoint: str, finished_reason: str) -> None:
    REQUEST_SUCCESS.labels(endpoint, finished_reason).inc()


def record_request_failure(endpoint: str, reason: str) -> None:
    """A generating request that failed: refused by its status (the HTTP gate), or ended
    after its status was sent or by a client that left (the route)."""
    REQUEST_FAILURE.labels(endpoint, reason).inc()


def record_image_received() -> None:
    IMAGES.inc()


def record_image_preprocessed(seconds: float) -> None:
    IMAGE_PREPROCESS_TIME.observe(seconds)


def record_model_info(info: ModelInfo, settings: Settings, max_model_len: int) -> None:
    MODEL_INFO.info(
        {
            "model": settings.model_id(),
            "dtype": str(info.dtype).removeprefix("torch."),
            "device": str(info.device),
            "block_size": str(settings.block_size),
            "max_model_len": str(max_model_len),
        }
    )
