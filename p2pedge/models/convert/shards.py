"""Block-range shard graphs for layer-wise sharding, and splitting an imported model.

A shard over ``[start, end)`` plays the role its position implies:

* ``first``  (start == 0):        ``input_ids`` -> embedding -> blocks -> ``hidden_states``
* ``middle``:                     ``hidden_states`` -> blocks -> ``hidden_states_out``
* ``last``   (end == n_layers):   ``hidden_states`` -> blocks -> final norm -> ``logits``
* ``full``   (both):              the ordinary decoder

Every shard also takes ``attention_mask`` [batch, total] and ``position_ids`` [batch, seq]
and owns only its blocks' KV cache, named with global block indices.

Splitting an existing model directory re-reads its weights from the ONNX initializers
(:func:`load_model_weights`) rather than keeping a separate weights cache: the directory
stays the single source of truth, and the builder's initializer naming makes the inverse
exact (Q4_1 nibbles are unpacked, the folded power-of-two attention scale divided out).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from p2pedge.ids import LayerRange
from p2pedge.models.convert.layout import (
    FACTS_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    ModelFacts,
    config_of,
    facts_dict,
    read_model_facts,
    save_onnx,
    weight_part,
    write_json,
)
from p2pedge.models.convert.onnx_graph import (
    HIDDEN_IN,
    HIDDEN_OUT_FIRST,
    HIDDEN_OUT_MIDDLE,
    INPUT_IDS,
    LOGITS,
    Attention,
    Variant,
    as_attention,
    as_variant,
    build_shard,
    exact_power_of_two,
)
from p2pedge.models.convert.onnx_ops import Q4_ZERO_POINT, unpack_nbits
from p2pedge.models.convert.tables import Q8_ZERO_POINT
from p2pedge.models.convert.weights import (
    F32,
    Q4_1_BLOCK,
    LlamaBlock,
    LlamaWeights,
    Matrix,
    Q4_1Matrix,
    QuantMatrix,
    Table,
)

Role = Literal["full", "first", "middle", "last"]
SHARD_FILE = "p2pedge_shard.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

__all__ = [
    "SHARD_FILE",
    "Role",
    "build_shard",
    "load_model_weights",
    "shard_files",
    "shard_io_names",
    "shard_role",
    "split_model_dir",
    "write_shard_dir",
]


def shard_role(layers: LayerRange, n_layers: int) -> Role:
    if layers.end > n_layers:
        raise ValueError(f"layer range {layers} exceeds {n_layers} blocks")
    first, last = layers.start == 0, layers.end == n_layers
    if first and last:
        return "full"
    return "first" if first else "last" if last else "middle"


def shard_io_names(role: Role) -> tuple[str, str]:
    """``(main input, main output)`` tensor names for a role."""
    return {
        "full": (INPUT_IDS, LOGITS),
        "first": (INPUT_IDS, HIDDEN_OUT_FIRST),
        "middle": (HIDDEN_IN, HIDDEN_OUT_MIDDLE),
        "last": (HIDDEN_IN, LOGITS),
    }[role]


def _unpack_q4_1(packed: np.ndarray, scales: F32, mins_t: F32, k: int) -> Q4_1Matrix:
    n = packed.shape[0]
    q = np.empty((n, k // Q4_1_BLOCK, Q4_1_BLOCK), dtype=np.uint8)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    quants = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    return Q4_1Matrix(
        out_features=n,
        in_features=k,
        scales=scales.reshape(n, k // Q4_1_BLOCK).astype(np.float32),
        mins=np.ascontiguousarray(mins_t.T).astype(np.float32),
        quants=quants,
    )


def _rows(m: Matrix, a: int, b: int) -> Matrix:
    if isinstance(m, QuantMatrix):
        return m.rows(a, b)
    if isinstance(m, Q4_1Matrix):
        return Q4_1Matrix(b - a, m.in_features, m.scales[a:b], m.mins[a:b], m.quants[a:b])
    return np.ascontiguousarray(m[a:b])


def _split_rows(parts: Sequence[Matrix], sizes: Sequence[int]) -> list[Matrix]:
    """Split fused ``parts`` (one per kernel call, in order) into matrices of ``sizes``
    rows; a kernel call fuses whole matrices only, so none straddles two parts."""
    out: list[Matrix] = []
    queue = list(parts)
    start = 0
    for size in sizes:
        if not queue:
            raise ValueError("fused parts have fewer rows than the matrices they hold")
        part = queue[0]
        rows = part.out_features if not isinstance(part, np.ndarray) else part.shape[0]
        if start + size > rows:
            raise ValueError("a fused matrix straddles two kernel calls")
        out.append(_rows(part, start, start + size))
        start += size
        if start == rows:
            queue.pop(0)
            start = 0
    return out


def _unscale(m: Matrix, factor: float) -> Matrix:
    f = np.float32(factor)
    if isinstance(m, QuantMatrix):
        return m.scaled(np.float32(1.0) / f)
    if isinstance(m, Q4_1Matrix):
        return Q4_1Matrix(m.out_features, m.in_features, m.scales / f, m.mins / f, m.quants)
    values: F32 = (m / f).astype(np.float32)
    return values


class _LoadedBlocks(Sequence[LlamaBlock]):
    """The blocks of one range, indexed by global block number; any other is not loaded."""

    def __init__(self, n_layers: int, start: int, blocks: Sequence[LlamaBlock]) -> None:
        self.n_layers, self.start, self.blocks = n_layers, start, tuple(blocks)

    def __len__(self) -> int:
        return self.n_layers

    @overload
    def __getitem__(self, index: int) -> LlamaBlock: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[LlamaBlock]: ...

    def __getitem__(self, index: int | slice) -> LlamaBlock | Sequence[LlamaBlock]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n_layers))]
        i = index + self.n_layers if index < 0 else index
        if not self.start <= i < self.start + len(self.blocks):
            end = self.start + len(self.blocks)
            raise IndexError(f"block {index} not loaded (only {self.start}-{end})")
        return self.blocks[i - self.start]


def _is_tied(graph: onnx.ModelProto) -> bool:
    return not any(weight_part(t.name) == "lm_head" for t in graph.graph.initializer)


def _shard_parts(layers: LayerRange, n_layers: int, tied: bool) -> set[str]:
    """The :func:`weight_part` files building the shard over ``layers`` reads."""
    parts = {weight_part(f"layers.{i}.") for i in range(layers.start, layers.end)}
    first, last = layers.start == 0, layers.end == n_layers
    if first or (last and tied):
        parts.add("embed")
    if last:
        parts |= {"final"} if tied else {"final", "lm_head"}
    return parts


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def shard_files(model_dir: Path, layers: LayerRange) -> list[str]:
    """The files of an imported model directory that building the shard over ``layers``
    reads: its facts, its graph, and the data files of the blocks, tables and norm that
    the shard uses. Needs only those two small files to be present; a shard server
    fetches the rest of the list and nothing else (see ``docs/sharding.md``)."""
    facts = _checked_facts(model_dir)
    if layers.end > facts.n_layers:
        raise ValueError(f"layer range {layers} exceeds {facts.n_layers} blocks")
    graph = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    parts = _shard_parts(layers, facts.n_layers, _is_tied(graph))
    files = {FACTS_FILE, MODEL_FILE}
    for tensor in graph.graph.initializer:
        location = _external_location(tensor)
        if location is not None and weight_part(tensor.name) in parts:
            files.add(location)
    return sorted(files)


def load_model_weights(model_dir: Path, layers: LayerRange | None = None) -> LlamaWeights:
    """Recover the :class:`LlamaWeights` a model directory (or full shard) was built from.

    With ``layers``, only what building that shard reads is loaded, so the directory needs
    only :func:`shard_files`: other blocks raise ``IndexError``, and the embedding table of
    a shard that neither embeds nor uses it as its head is empty.
    """
    facts = read_model_facts(model_dir)
    cfg = config_of(facts)
    span = layers or LayerRange(0, cfg.n_layers)
    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    parts = _shard_parts(span, cfg.n_layers, _is_tied(model))
    init: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if _external_location(tensor) is not None:
            if layers is not None and weight_part(tensor.name) not in parts:
                continue
            load_external_data_for_tensor(tensor, str(model_dir))
        init[tensor.name] = numpy_helper.to_array(tensor)

    def matrices(prefix: str, k: int) -> list[Matrix]:
        """The matrices of one fused kernel call, or of each ``.part<j>`` of a split one."""
        parts: list[Matrix] = []
        while any(name.startswith(f"{prefix}.part{len(parts)}.") for name in init):
            parts.append(matrix(f"{prefix}.part{len(parts)}", k))
        return parts or [matrix(prefix, k)]

    def matrix(prefix: str, k: int) -> Matrix:
        if f"{prefix}.weight_t" in init:
            w: F32 = np.ascontiguousarray(init[f"{prefix}.weight_t"].T)
            return w
        if f"{prefix}.nbits_weight" in init:
            packed = init[f"{prefix}.nbits_weight"]
            n, blocks = packed.shape[0], packed.shape[1]
            block = k // blocks
            bits = packed.shape[2] * 8 // block
            zero = int(init[f"{prefix}.nbits_zero_points"][0]) & (0xFF if bits == 8 else 0x0F)
            mins_t = init.get(f"{prefix}.nbits_mins_t")
            q = unpack_nbits(packed, bits)
            if f"{prefix}.nbits_hi_weight" in init:  # 8-bit as two 4-bit halves
                high = unpack_nbits(init[f"{prefix}.nbits_hi_weight"], 4)
                q = (q | (high << 4)).astype(np.uint8)
                bits = 8
                zero = 16 * (int(init[f"{prefix}.nbits_hi_zero_points"][0]) & 0x0F)
            return QuantMatrix(
                n,
                k,
                block,
                bits,
                zero,
                init[f"{prefix}.nbits_scales"].reshape(n, blocks),
                None if mins_t is None else np.ascontiguousarray(mins_t.T),
                q,
            )
        scales = init[f"{prefix}.scales"]
        if f"{prefix}.offsets_t" not in init and f"{prefix}.mins_t" not in init:
            n = init[f"{prefix}.qweight"].shape[0]  # Q4_0: s (q - 8), no offsets
            mins_t = np.ascontiguousarray((scales.reshape(n, -1) * np.float32(-8.0)).T)
        elif f"{prefix}.offsets_t" in init:
            n = init[f"{prefix}.qweight"].shape[0]
            centred = init[f"{prefix}.offsets_t"].T.astype(np.float64)
            mins_f64 = centred - Q4_ZERO_POINT * scales.reshape(n, -1).astype(np.float64)
            mins_t = np.ascontiguousarray(mins_f64.astype(np.float32).T)
        else:
            mins_t = init[f"{prefix}.mins_t"]
        return _unpack_q4_1(init[f"{prefix}.qweight"], scales, mins_t, k)

    scale = cfg.softmax_scale()
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    blocks = []
    for i in range(span.start, span.end):
        wq, wk, wv = _split_rows(
            matrices(f"layers.{i}.attn.qkv", cfg.hidden), [q_dim, kv_dim, kv_dim]
        )
        bias = init.get(f"layers.{i}.attn.qkv_bias")
        bq, bk, bv = (None, None, None) if bias is None else np.split(bias, [q_dim, q_dim + kv_dim])
        q_norm = init.get(f"layers.{i}.attn.q_norm")
        if exact_power_of_two(scale) and q_norm is not None:  # qwen3/gemma3: in the q norm
            q_norm = (q_norm / np.float32(scale)).astype(np.float32)
        elif exact_power_of_two(scale):
            wq = _unscale(wq, scale)
            bq = None if bq is None else (bq / np.float32(scale)).astype(np.float32)
        gate_up = matrices(f"layers.{i}.mlp.gate_up", cfg.hidden)
        w_gate, w_up = _split_rows(gate_up, [cfg.ffn] * 2)
        blocks.append(
            LlamaBlock(
                attn_norm=init[f"layers.{i}.attn_norm"],
                wq=wq,
                wk=wk,
                wv=wv,
                wo=_split_rows(matrices(f"layers.{i}.attn.o", q_dim), [cfg.hidden])[0],
                ffn_norm=init[f"layers.{i}.ffn_norm"],
                w_gate=w_gate,
                w_up=w_up,
                w_down=_split_rows(matrices(f"layers.{i}.mlp.down", cfg.ffn), [cfg.hidden])[0],
                bq=bq,
                bk=bk,
                bv=bv,
                q_norm=q_norm,
                k_norm=init.get(f"layers.{i}.attn.k_norm"),
                attn_post_norm=init.get(f"layers.{i}.attn_post_norm"),
                ffn_post_norm=init.get(f"layers.{i}.ffn_post_norm"),
            )
        )

    def table(prefix: str) -> Table | None:
        if f"{prefix}.nbits_weight" in init:
            quant = matrix(prefix, cfg.hidden)
            assert isinstance(quant, QuantMatrix)  # matrix() recovers nbits as QuantMatrix
            return quant
        if f"{prefix}.weight" in init:
            dense: F32 = init[f"{prefix}.weight"]
            return dense
        if f"{prefix}.q8_weight" not in init:
            return None
        u = init[f"{prefix}.q8_weight"]
        d = init[f"{prefix}.q8_scales"].reshape(u.shape[0], u.shape[1], 1)
        q = u.astype(np.float32) - np.float32(Q8_ZERO_POINT)
        values: F32 = (q * d).astype(np.float32).reshape(u.shape[0], -1)
        return values

    token_embd = table("model.embed_tokens")
    if token_embd is None:
        if "embed" in parts:
            raise ValueError(f"{model_dir} has no token embedding")
        token_embd = np.zeros((0, cfg.hidden), np.float32)
    last = span.end == cfg.n_layers
    output_norm = init["final_norm"] if last else np.zeros(0, np.float32)
    return LlamaWeights(
        config=cfg,
        token_embd=token_embd,
        blocks=tuple(blocks) if layers is None else _LoadedBlocks(cfg.n_layers, span.start, blocks),
        output_norm=output_norm,
        lm_head=table("lm_head"),
    )


def _checked_facts(model_dir: Path) -> ModelFacts:
    facts = read_model_facts(model_dir)
    if facts.format_version != FORMAT_VERSION:
        raise ValueError(
            f"{model_dir} has graph format {facts.format_version}, this builder writes "
            f"{FORMAT_VERSION}: re-import the model before splitting it"
        )
    return facts


def write_shard_dir(
    source: LlamaWeights | Path,
    layers: LayerRange,
    out_dir: Path,
    variant: Variant | None = None,
    int8_activations: bool | None = None,
    attention: Attention = "gqa",
    int8_limbs: bool = False,
) -> Path:
    """Write ``model.onnx`` (+ data) and ``p2pedge_shard.json`` for one shard.

    ``source`` is either in-memory weights (then ``variant`` is required) or an imported
    model directory whose variant, activation mode, attention, facts and tokenizer files
    are reused.
    """
    facts: ModelFacts | None = None
    if isinstance(source, Path):
        facts = _checked_facts(source)
        weights = load_model_weights(source, layers)
        variant = variant or as_variant(facts.variant)
        if int8_activations is None:
            int8_activations = facts.int8_activations
        attention = as_attention(facts.attention)
        int8_limbs = facts.int8_limbs
    else:
        weights = source
    if variant is None:
        raise ValueError("variant is required when building from in-memory weights")
    int8 = bool(int8_activations)
    role = shard_role(layers, weights.config.n_layers)
    save_onnx(build_shard(weights, layers, variant, int8, attention, int8_limbs), out_dir)
    main_in, main_out = shard_io_names(role)
    meta = {
        "start": layers.start,
        "end": layers.end,
        "n_layers": weights.config.n_layers,
        "role": role,
        "input": main_in,
        "output": main_out,
        "variant": variant,
        "int8_activations": int8,
        "int8_limbs": int8_limbs,
        "attention": attention,
        "hidden": weights.config.hidden,
        "vocab": weights.config.vocab,
    }
    write_json(out_dir / SHARD_FILE, meta)
    if facts is not None:
        write_json(out_dir / FACTS_FILE, facts_dict(facts))
    if isinstance(source, Path):
        _copy_tokenizer(source, out_dir)
    return out_dir


def _copy_tokenizer(model_dir: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:  # the first shard encodes, the last one decodes
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)


def split_model_dir(model_dir: Path, ranges: Sequence[LayerRange], out_root: Path) -> list[Path]:
    """Split an imported model into shard directories ``out_root/<start>-<end>``.

    Each gets the shard graph, ``p2pedge_shard.json``, the model's ``p2pedge_model.json``
    and its tokenizer files.
    """
    facts = _checked_facts(model_dir)
    expected = 0
    for r in ranges:
        if r.start != expected:
            raise ValueError(f"ranges must tile [0, {facts.n_layers}) in order; got {r}")
        expected = r.end
    if expected != facts.n_layers:
        raise ValueError(f"ranges end at {expected}, model has {facts.n_layers} blocks")
    weights = load_model_weights(model_dir)
    int8 = facts.int8_activations
    variant, attention = as_variant(facts.variant), as_attention(facts.attention)
    out: list[Path] = []
    for r in ranges:
        path = write_shard_dir(
            weights, r, out_root / str(r), variant, int8, attention, facts.int8_limbs
        )
        write_json(path / FACTS_FILE, facts_dict(facts))
        _copy_tokenizer(model_dir, path)
        out.append(path)
    return out


def read_shard_meta(shard_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((shard_dir / SHARD_FILE).read_text(encoding="utf-8"))
    return data
