"""Runtime knobs: execution providers, threads, cache limits and queue depth.

Plain data so the node can build it from its own config and tests can shrink it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from p2pedge.errors import ConfigError
from p2pedge.runtime.inline import DEFAULT_INLINE_STEP_S
from p2pedge.runtime.policy import DEFAULT_HALF_LIFE_S

DEFAULT_PROVIDER_ORDER: tuple[str, ...] = (
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)

MIN_MODELS = 2
MAX_MODELS = 10


@dataclass(frozen=True)
class RuntimeConfig:
    """How local models are run and how many stay warm.

    ``memory_budget_bytes=None`` means ``memory_share`` of the RAM available when the
    cache is created. ``allow_spinning=None`` turns spinning off, because the cache
    always holds several sessions sharing the same cores (spinning threads of an idle
    session steal CPU from the busy one).
    """

    providers: tuple[str, ...] = DEFAULT_PROVIDER_ORDER
    intra_op_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allow_spinning: bool | None = None
    max_models: int = 4
    memory_budget_bytes: int | None = None
    memory_share: float = 0.5
    queue_limit: int = 8
    max_active_per_model: int = 16
    # KV cache the running generations of one model may reserve together (each reserves its
    # prompt plus max_tokens positions); one generation alone is always admitted
    kv_budget_bytes: int = 1 << 30
    cache_half_life_s: float = DEFAULT_HALF_LIFE_S  # see runtime/policy.py
    # a generated token whose recent cost is this short runs on the event loop's thread
    # instead of a worker thread (runtime/inline.py); 0 never does
    inline_step_s: float = DEFAULT_INLINE_STEP_S

    def __post_init__(self) -> None:
        if not self.providers:
            raise ConfigError("providers must name at least one execution provider")
        if self.intra_op_threads < 1:
            raise ConfigError(f"intra_op_threads must be >= 1, got {self.intra_op_threads}")
        if not MIN_MODELS <= self.max_models <= MAX_MODELS:
            raise ConfigError(
                f"max_models must be in [{MIN_MODELS}, {MAX_MODELS}], got {self.max_models}"
            )
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ConfigError(f"memory_budget_bytes must be > 0, got {self.memory_budget_bytes}")
        if not 0.0 < self.memory_share <= 1.0:
            raise ConfigError(f"memory_share must be in (0, 1], got {self.memory_share}")
        if self.queue_limit < 0:
            raise ConfigError(f"queue_limit must be >= 0, got {self.queue_limit}")
        if self.cache_half_life_s <= 0:
            raise ConfigError(f"cache_half_life_s must be > 0, got {self.cache_half_life_s}")
        if not 0.0 <= self.inline_step_s <= 1.0:
            raise ConfigError(f"inline_step_s must be in [0, 1], got {self.inline_step_s}")
        if self.max_active_per_model < 1:
            raise ConfigError(f"max_active_per_model must be >= 1, got {self.max_active_per_model}")
        if self.kv_budget_bytes < 1:
            raise ConfigError(f"kv_budget_bytes must be >= 1, got {self.kv_budget_bytes}")

    @property
    def spinning(self) -> bool:
        """Whether intra-op threads may busy-wait (off unless explicitly enabled)."""
        return bool(self.allow_spinning)
