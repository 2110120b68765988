"""Every Prometheus collector of mmgpt, named in one place.

Other modules call the helpers below; none defines a collector of its own.
Labels stay low-cardinality: routes are templates, never raw paths.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

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

NUM_REQUESTS_RUNNING = Gauge("mmgpt_num_requests_running", "Requests in the running queue.")
NUM_REQUESTS_WAITING = Gauge("mmgpt_num_requests_waiting", "Requests in the waiting queue.")
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
