"""One transformer shard on plain onnxruntime, with the KV cache held explicitly.

A :class:`ShardModel` owns the ``InferenceSession`` (loaded once, shared); each client
session gets a :class:`ShardSession` holding only its own KV arrays, so many sessions
share one copy of the weights. The shard's role is read from its graph: ``input_ids``
in means it embeds, ``logits`` out means it ends with the final norm and LM head.
No trio here: callers run :meth:`ShardSession.step` in a worker thread.

On CPU, a GroupQueryAttention shard runs like onnxruntime-genai runs the whole model: each
block's past and present KV are one buffer sized for the session (bound through an
``IOBinding``), which GQA appends to in place. The plain ``run()`` path instead copies the
whole cache into a new present array every step (O(length) per token) and converts two
arrays per block each way (bit-identical outputs; for blocks 10-20 of SmolLM2, 0.35 ms
less per step at 40-100 positions and 1.45 ms at 580-640: ``benchmarks/kv_in_place.py``).
Other graphs and providers keep that plain path.
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
from p2pedge.records.facts import FACTS_FILE
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


def _graph(model: str | Path | bytes) -> Any:
    """The graph without external weights (enough to read ops and initialiser shapes)."""
    import onnx

    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model), load_external_data=False)


def gather_table_rows(model: Any) -> dict[str, int]:
    """Rows of the tables that ``Gather`` (or ``RotaryEmbedding``'s cos cache) indexes
    with each graph input.

    ``input_ids`` -> vocabulary size, ``position_ids`` -> context length (rotary table).
    Reads only the graph (``model`` is a path, bytes or a loaded ``ModelProto``), not
    external weights: the runtime cannot tell us these, and a server must reject ids and
    positions out of range before they reach a kernel.
    """
    proto = model if hasattr(model, "graph") else _graph(model)
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


def _can_share_kv(session: ort.InferenceSession, proto: Any, info: ShardInfo) -> bool:
    """Past and present KV may be one in-place buffer: every block's attention is GQA
    (which appends in place when the two are the same memory), on CPU (the buffers are
    numpy arrays), with a float32 output we can preallocate."""
    attention = sum(n.op_type == "GroupQueryAttention" for n in proto.graph.node)
    output = next(o for o in session.get_outputs() if o.name == info.output)
    on_cpu = session.get_providers()[0] == "CPUExecutionProvider"
    return attention == len(info.blocks) and on_cpu and str(output.type) == "tensor(float)"


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
        proto = _graph(model)
        rows = gather_table_rows(proto)
        self.info = inspect_session(self.session, rows.get(INPUT_IDS))
        self.context_length: int | None = rows.get(POSITION_IDS)
        self.shares_kv = _can_share_kv(self.session, proto, self.info)

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
        model._bounds_from_arch(shard_dir / FACTS_FILE)
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


@dataclass(frozen=True)
class _DecodeBuffers:
    """A decode step's input, position and output, bound to a session's IOBinding; the
    binding reads and writes these arrays in place."""

    x: npt.NDArray[Any]
    position: npt.NDArray[np.int64]
    out: npt.NDArray[np.float32]

    @classmethod
    def bind(cls, io: ort.IOBinding, info: ShardInfo) -> _DecodeBuffers:
        if info.first:
            x: npt.NDArray[Any] = np.zeros((1, 1), dtype=np.int64)
        else:
            x = np.zeros((1, 1, info.hidden), dtype=np.float32)
        width = info.vocab if info.last else info.hidden
        buffers = cls(x, np.zeros((1, 1), dtype=np.int64), np.empty((1, 1, width or 0), np.float32))
        io.bind_ortvalue_input(INPUT_IDS if info.first else HIDDEN_IN, _borrow(buffers.x))
        io.bind_ortvalue_input(POSITION_IDS, _borrow(buffers.position))
        io.bind_ortvalue_output(info.output, _borrow(buffers.out))
        return buffers


def _borrow(array: npt.NDArray[Any]) -> ort.OrtValue:
    """An OrtValue over ``array``'s memory (no copy; the array must outlive it)."""
    return ort.OrtValue.ortvalue_from_numpy(array)


class ShardSession:
    """One client's KV cache on a shard; ``step`` appends ``n`` positions after ``start``."""

    def __init__(self, model: ShardModel, max_length: int) -> None:
        if max_length < 1:
            raise LocalProtocolError("max_length must be >= 1")
        self.model = model
        self.max_length = max_length
        self.limit = min(max_length, model.context_length or max_length)
        self._kv: dict[str, npt.NDArray[np.float32]] = {}
        self._length = 0
        # attention mask and position ids are slices of these (allocating them per step
        # costs more than the slicing once the step has flushed the CPU caches)
        self._ones = np.ones((1, self.limit), dtype=np.int64)
        self._positions = np.arange(self.limit, dtype=np.int64)[None, :]
        self._io: ort.IOBinding | None = None
        self._decode: _DecodeBuffers | None = None  # bound while decode steps repeat
        info = model.info
        self._decode_shape = (1, 1) if info.first else (1, 1, info.hidden)
        if model.shares_kv:
            self._bind_shared_kv()
        else:
            self.reset()

    def _bind_shared_kv(self) -> None:
        """One zeroed buffer per block key and value, bound as both past and present (pages
        are committed as positions are written, so a long ``max_length`` costs little)."""
        info = self.model.info
        io = self.model.session.io_binding()
        shape = (1, info.n_kv_heads, self.limit, info.head_dim)
        for b in info.blocks:
            for kind in ("key", "value"):
                buffer = np.zeros(shape, dtype=np.float32)
                self._kv[f"past_key_values.{b}.{kind}"] = buffer  # the binding borrows it
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                io.bind_ortvalue_input(f"past_key_values.{b}.{kind}", value)
                io.bind_ortvalue_output(f"present.{b}.{kind}", value)
        self._io = io

    @property
    def length(self) -> int:
        """Positions currently cached."""
        return self._length

    def reset(self) -> None:
        self._length = 0
        if self._io is not None:
            return  # stale positions are overwritten before attention reads them
        info = self.model.info
        empty = np.zeros((1, info.n_kv_heads, 0, info.head_dim), dtype=np.float32)
        self._kv = {}
        for b in info.blocks:
            self._kv[f"past_key_values.{b}.key"] = empty
            self._kv[f"past_key_values.{b}.value"] = empty

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on (a resent or replayed step)."""
        if not 0 <= length <= self._length:
            raise LocalProtocolError(f"cannot rewind to {length}; {self._length} cached")
        if length < self._length and self._io is None:
            self._kv = {k: np.ascontiguousarray(v[:, :, :length]) for k, v in self._kv.items()}
        self._length = length

    def step(self, x: npt.NDArray[Any], start: int, *, last_only: bool = True) -> npt.NDArray[Any]:
        """Run positions ``start .. start + n`` (rewinding first); keeps the new KV.

        ``x`` is int64 token ids ``[1, n]`` for a first shard, float hidden states
        ``[1, n, hidden]`` otherwise. A last shard returns logits, of the last position
        only (``[1, vocab]``) when ``last_only``.

        Non-finite input raises :class:`LocalProtocolError` and a non-finite output
        :class:`ShardFailed`, so NaN is refused where it first shows instead of being
        passed on and blamed on a later hop.
        """
        info = self.model.info
        n = int(x.shape[1])
        if start + n > self.limit:
            raise LocalProtocolError(f"{start + n} positions exceed the limit {self.limit}")
        self.rewind(start)
        if info.first:
            x = np.ascontiguousarray(x, dtype=np.int64)
        else:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if not np.isfinite(x).all():
                raise LocalProtocolError("non-finite hidden states in")
        mask = self._ones[:, : start + n]
        positions = self._positions[:, start : start + n]
        try:
            out: npt.NDArray[Any]
            if self._io is not None and x.shape == self._decode_shape:
                out = self._run_decode(x, start, mask, last_only)
            else:
                if self._io is not None:
                    out = self._run_shared(x, mask, positions)
                else:
                    out = self._run_plain(x, mask, positions)
                self._length = start + n
                if info.last and last_only:
                    out = np.ascontiguousarray(out[:, -1, :])
        except _ORT_ERRORS as exc:
            raise ShardFailed(f"onnxruntime step failed: {exc}") from exc
        if not np.isfinite(out).all():
            raise ShardFailed(f"non-finite output at positions {start}-{start + n}")
        return out

    def _run_decode(
        self, x: npt.NDArray[Any], start: int, mask: npt.NDArray[np.int64], last_only: bool
    ) -> npt.NDArray[Any]:
        """One position through buffers bound once: only the mask is bound per step
        (binding the token or hidden state, the position and the output each step cost
        0.07-0.09 ms per shard step once a step had flushed the CPU caches)."""
        info, io = self.model.info, self._io
        assert io is not None
        buffers = self._decode
        if buffers is None:
            buffers = self._decode = _DecodeBuffers.bind(io, info)
        buffers.x[...] = x.reshape(buffers.x.shape)
        buffers.position[0, 0] = start
        io.bind_cpu_input(ATTENTION_MASK, mask)
        self.model.session.run_with_iobinding(io)
        self._length = start + 1
        if info.last and last_only:
            return buffers.out[:, -1, :].copy()
        return buffers.out.copy()

    def _run_shared(
        self, x: npt.NDArray[Any], mask: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        info, io = self.model.info, self._io
        assert io is not None
        self._decode = None  # the bindings below replace the decode buffers'
        io.bind_cpu_input(INPUT_IDS if info.first else HIDDEN_IN, x)
        io.bind_cpu_input(ATTENTION_MASK, mask)
        io.bind_cpu_input(POSITION_IDS, positions)
        width = info.vocab if info.last else info.hidden
        out = np.empty((1, x.shape[1], width or 0), dtype=np.float32)
        io.bind_output(info.output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self.model.session.run_with_iobinding(io)
        return out

    def _run_plain(
        self, x: npt.NDArray[Any], mask: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]
    ) -> npt.NDArray[Any]:
        info = self.model.info
        feeds: dict[str, npt.NDArray[Any]] = dict(self._kv)
        feeds[INPUT_IDS if info.first else HIDDEN_IN] = x
        feeds[ATTENTION_MASK] = mask
        feeds[POSITION_IDS] = positions
        names = [info.output]
        for b in info.blocks:
            names += [f"present.{b}.key", f"present.{b}.value"]
        results = self.model.session.run(names, feeds)
        for b, i in zip(info.blocks, range(1, len(results), 2), strict=True):
            self._kv[f"past_key_values.{b}.key"] = results[i]
            self._kv[f"past_key_values.{b}.value"] = results[i + 1]
        out: npt.NDArray[Any] = results[0]
        return out
