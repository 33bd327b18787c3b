"""One transformer shard on plain onnxruntime, with the KV cache held explicitly.

A :class:`ShardModel` owns the ``InferenceSession`` (loaded once, shared); each client
session gets a :class:`ShardSession` holding only its own KV arrays, so many sessions
share one copy of the weights. The shard's role is read from its graph: ``input_ids``
in means it embeds, ``logits`` out means it ends with the final norm and LM head.
No trio here: callers run :meth:`ShardSession.step` in a worker thread.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from p2pedge.errors import LocalProtocolError, ModelLoadError, ShardFailed
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.providers import pick_providers

INPUT_IDS = "input_ids"
HIDDEN_IN = "hidden_states"
LOGITS = "logits"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")
F32_BYTES = 4
SHARD_FILE = "p2pedge_shard.json"
MODEL_FILE = "model.onnx"

# onnxruntime's Python errors share no base class below Exception.
_ORT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    *tuple(
        e
        for e in vars(ort.capi.onnxruntime_pybind11_state).values()
        if isinstance(e, type) and issubclass(e, Exception)
    ),
)

_pool_lock = threading.Lock()
_pool_threads: int | None = None


def _use_global_pool(threads: int) -> bool:
    """Size ORT's process-wide thread pool once; later callers share it.

    Sessions with their own pools each park ``threads`` workers on the same cores; one
    pool for every shard in the process keeps the thread count at the core count. But
    once it exists, onnxruntime refuses EVERY later session in the process that does not
    set ``use_per_session_threads = False`` (measured with 1.32), so it is opt-in.
    """
    global _pool_threads
    with _pool_lock:
        if _pool_threads is None:
            ort.set_global_thread_pool_sizes(threads, 1)
            _pool_threads = threads
        return True


@dataclass(frozen=True)
class ShardInfo:
    """What a shard graph takes and gives, read from its inputs and outputs."""

    blocks: tuple[int, ...]
    first: bool
    last: bool
    hidden: int
    vocab: int | None
    n_kv_heads: int
    head_dim: int
    output: str

    @property
    def kv_bytes_per_token(self) -> int:
        return len(self.blocks) * self.n_kv_heads * self.head_dim * 2 * F32_BYTES

    def kv_bytes(self, max_length: int) -> int:
        return max_length * self.kv_bytes_per_token


def _static(dim: Any, what: str) -> int:
    if not isinstance(dim, int):
        raise ModelLoadError(f"{what} must be a fixed dimension, got {dim!r}")
    return dim


def gather_table_rows(model: str | Path | bytes) -> dict[str, int]:
    """Rows of the tables that ``Gather`` (or ``RotaryEmbedding``'s cos cache) indexes
    with each graph input.

    ``input_ids`` -> vocabulary size, ``position_ids`` -> context length (rotary table).
    Reads only the graph, not external weights: the runtime cannot tell us these, and a
    server must reject ids and positions out of range before they reach a kernel.
    """
    import onnx

    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        proto = onnx.load(str(model), load_external_data=False)
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    rows: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2:
            index, table = node.input[1], dims.get(node.input[0])
        elif node.op_type == "RotaryEmbedding" and len(node.input) >= 3:
            index, table = node.input[1], dims.get(node.input[2])
        else:
            continue
        if table and index in (INPUT_IDS, POSITION_IDS):
            rows[index] = min(int(table[0]), rows.get(index, 1 << 62))
    return rows


def inspect_session(session: ort.InferenceSession, vocab_in: int | None = None) -> ShardInfo:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    blocks = sorted(int(m.group(1)) for n in inputs if (m := _PAST.match(n)))
    if not blocks or blocks != list(range(blocks[0], blocks[-1] + 1)):
        raise ModelLoadError(f"shard has no contiguous past_key_values inputs: {blocks}")
    kv_shape = inputs[f"past_key_values.{blocks[0]}.key"].shape
    first = INPUT_IDS in inputs
    if not first and HIDDEN_IN not in inputs:
        raise ModelLoadError("shard takes neither input_ids nor hidden_states")
    last = LOGITS in outputs
    hidden_outs = [n for n in outputs if n.startswith("hidden_states")]
    output = LOGITS if last else (hidden_outs[0] if hidden_outs else "")
    if not output:
        raise ModelLoadError("shard gives neither logits nor hidden states")
    vocab = _static(outputs[LOGITS].shape[-1], "vocab") if last else vocab_in
    if first and last:
        hidden = 0
    elif first:
        hidden = _static(outputs[output].shape[-1], "hidden")
    else:
        hidden = _static(inputs[HIDDEN_IN].shape[-1], "hidden")
    return ShardInfo(
        blocks=tuple(blocks),
        first=first,
        last=last,
        hidden=hidden,
        vocab=vocab,
        n_kv_heads=_static(kv_shape[1], "kv heads"),
        head_dim=_static(kv_shape[3], "head dim"),
        output=output,
    )


class ShardModel:
    """A loaded shard graph; cheap :class:`ShardSession` objects run it."""

    def __init__(
        self,
        model: str | Path | bytes,
        config: RuntimeConfig | None = None,
        *,
        shared_threads: bool = False,
    ) -> None:
        config = config or RuntimeConfig()
        options = ort.SessionOptions()
        spin = "1" if config.spinning else "0"
        if shared_threads and _use_global_pool(config.intra_op_threads):
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = config.intra_op_threads
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(
                source, options, providers=pick_providers(config.providers)
            )
        except Exception as exc:  # ORT raises bare RuntimeError subclasses on bad files
            raise ModelLoadError(f"cannot load shard: {exc}") from exc
        self.n_layers: int | None = None
        rows = gather_table_rows(model)
        self.info = inspect_session(self.session, rows.get(INPUT_IDS))
        self.context_length: int | None = rows.get(POSITION_IDS)

    @classmethod
    def from_dir(
        cls, shard_dir: Path, config: RuntimeConfig | None = None, *, shared_threads: bool = False
    ) -> ShardModel:
        """Load a shard directory (``model.onnx`` + ``p2pedge_shard.json``)."""
        meta_path = shard_dir / SHARD_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"unreadable shard manifest {meta_path}: {exc}") from exc
        model = cls(shard_dir / MODEL_FILE, config, shared_threads=shared_threads)
        blocks = tuple(range(int(meta["start"]), int(meta["end"])))
        if model.info.blocks != blocks:
            raise ModelLoadError(f"{shard_dir}: graph has blocks {model.info.blocks}, not {blocks}")
        model.n_layers = int(meta["n_layers"])
        model._bounds_from_arch(shard_dir / "p2pedge_model.json")
        return model

    def _bounds_from_arch(self, arch_path: Path) -> None:
        """Vocabulary and context bounds from the model's facts when the graph hides them
        (a quantised embedding is a GatherBlockQuantized, not a plain Gather)."""
        if (self.info.vocab and self.context_length) or not arch_path.is_file():
            return
        try:
            arch = json.loads(arch_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"unreadable {arch_path}: {exc}") from exc
        if not self.info.vocab and isinstance(arch.get("vocab"), int):
            self.info = dataclasses.replace(self.info, vocab=int(arch["vocab"]))
        if not self.context_length and isinstance(arch.get("context_length"), int):
            self.context_length = int(arch["context_length"])

    def new_session(self, max_length: int) -> ShardSession:
        return ShardSession(self, max_length)


class ShardSession:
    """One client's KV cache on a shard; ``step`` appends ``n`` positions after ``start``."""

    def __init__(self, model: ShardModel, max_length: int) -> None:
        if max_length < 1:
            raise LocalProtocolError("max_length must be >= 1")
        self.model = model
        self.max_length = max_length
        self._kv: dict[str, npt.NDArray[np.float32]] = {}
        self.reset()

    @property
    def length(self) -> int:
        """Positions currently cached."""
        first = next(iter(self._kv.values()))
        return int(first.shape[2])

    def reset(self) -> None:
        info = self.model.info
        empty = np.zeros((1, info.n_kv_heads, 0, info.head_dim), dtype=np.float32)
        self._kv = {}
        for b in info.blocks:
            self._kv[f"past_key_values.{b}.key"] = empty
            self._kv[f"past_key_values.{b}.value"] = empty

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on (a resent or replayed step)."""
        if not 0 <= length <= self.length:
            raise LocalProtocolError(f"cannot rewind to {length}; {self.length} cached")
        if length < self.length:
            self._kv = {k: np.ascontiguousarray(v[:, :, :length]) for k, v in self._kv.items()}

    def step(self, x: npt.NDArray[Any], start: int, *, last_only: bool = True) -> npt.NDArray[Any]:
        """Run positions ``start .. start + n`` (rewinding first); keeps the new KV.

        ``x`` is int64 token ids ``[1, n]`` for a first shard, float hidden states
        ``[1, n, hidden]`` otherwise. A last shard returns logits, of the last position
        only (``[1, vocab]``) when ``last_only``.
        """
        info = self.model.info
        n = int(x.shape[1])
        limit = min(self.max_length, self.model.context_length or self.max_length)
        if start + n > limit:
            raise LocalProtocolError(f"{start + n} positions exceed the limit {limit}")
        self.rewind(start)
        feeds: dict[str, npt.NDArray[Any]] = dict(self._kv)
        if info.first:
            feeds[INPUT_IDS] = np.ascontiguousarray(x, dtype=np.int64)
        else:
            feeds[HIDDEN_IN] = np.ascontiguousarray(x, dtype=np.float32)
        feeds[ATTENTION_MASK] = np.ones((1, start + n), dtype=np.int64)
        feeds[POSITION_IDS] = np.arange(start, start + n, dtype=np.int64)[None, :]
        names = [info.output]
        for b in info.blocks:
            names += [f"present.{b}.key", f"present.{b}.value"]
        try:
            results = self.model.session.run(names, feeds)
        except _ORT_ERRORS as exc:
            raise ShardFailed(f"onnxruntime step failed: {exc}") from exc
        for b, i in zip(info.blocks, range(1, len(results), 2), strict=True):
            self._kv[f"past_key_values.{b}.key"] = results[i]
            self._kv[f"past_key_values.{b}.value"] = results[i + 1]
        out: npt.NDArray[Any] = results[0]
        if info.last and last_only:
            return np.ascontiguousarray(out[:, -1, :])
        return out
