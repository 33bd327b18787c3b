"""Signed manifests: canonical bytes, signatures, trust, unsafe paths, chunk lists."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from p2pedge.errors import IntegrityError
from p2pedge.ids import ModelId
from p2pedge.models.keys import (
    BadSignature,
    TrustStore,
    UntrustedPublisher,
    generate_key,
    load_private_key,
    public_key_hex,
    save_private_key,
)
from p2pedge.models.manifest import (
    ManifestError,
    build_manifest,
    canonical_json,
    check_relative_path,
    load_verified,
    parse_manifest,
    scan_model_dir,
    sign_manifest,
)

CHUNK = 4096


def make_dir(root: Path) -> Path:
    model = root / "m"
    (model / "sub").mkdir(parents=True)
    (model / "model.onnx").write_bytes(os.urandom(3 * CHUNK + 17))
    (model / "sub" / "tokenizer.json").write_bytes(b'{"a": 1}')
    (model / "empty.bin").write_bytes(b"")
    (model / "p2pedge_model.json").write_text(json.dumps({"n_layers": 4, "hidden": 64}))
    return model


def test_build_sign_verify_roundtrip(tmp_path: Path) -> None:
    key = generate_key()
    manifest = build_manifest(
        make_dir(tmp_path), ModelId("tiny", "1"), "llm", key, tags=["b", "a"], chunk_size=CHUNK
    )
    trust = TrustStore([public_key_hex(key)])
    again = load_verified(manifest.to_bytes(), trust, expect=ModelId("tiny", "latest"))
    assert again.model == ModelId("tiny", "1")
    assert again.arch == {"n_layers": 4, "hidden": 64}
    assert again.tags == ("a", "b")
    onnx = again.file("model.onnx")
    assert onnx.size == 3 * CHUNK + 17 and len(onnx.chunks) == 4
    assert again.file("empty.bin").size == 0 and len(again.file("empty.bin").chunks) == 1
    assert [f.path for f in again.select(["sub/tokenizer.json"])] == ["sub/tokenizer.json"]
    assert again.signed_bytes() == canonical_json(
        {k: v for k, v in json.loads(manifest.to_bytes()).items() if k != "signature"}
    )


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_tampered_field_fails_signature(tmp_path: Path) -> None:
    key = generate_key()
    manifest = build_manifest(
        make_dir(tmp_path), ModelId("tiny", "1"), "llm", key, chunk_size=CHUNK
    )
    raw = json.loads(manifest.to_bytes())
    raw["category"] = "evil"
    with pytest.raises(BadSignature):
        load_verified(canonical_json(raw), TrustStore([public_key_hex(key)]))


def test_unknown_publisher_refused(tmp_path: Path) -> None:
    manifest = build_manifest(
        make_dir(tmp_path), ModelId("tiny", "1"), "llm", generate_key(), chunk_size=CHUNK
    )
    with pytest.raises(UntrustedPublisher) as info:
        load_verified(manifest.to_bytes(), TrustStore([public_key_hex(generate_key())]))
    assert isinstance(info.value, IntegrityError)


def test_wrong_model_refused(tmp_path: Path) -> None:
    key = generate_key()
    manifest = build_manifest(
        make_dir(tmp_path), ModelId("tiny", "1"), "llm", key, chunk_size=CHUNK
    )
    with pytest.raises(ManifestError):
        load_verified(manifest.to_bytes(), TrustStore([public_key_hex(key)]), ModelId("tiny", "2"))


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../b", "a//b", "./a", "a\\b", "", "a/", "x\x00y"]
)
def test_unsafe_paths_refused(path: str) -> None:
    with pytest.raises(ManifestError):
        check_relative_path(path)


def test_signed_traversal_path_still_refused(tmp_path: Path) -> None:
    key = generate_key()
    manifest = build_manifest(
        make_dir(tmp_path), ModelId("tiny", "1"), "llm", key, chunk_size=CHUNK
    )
    raw = json.loads(manifest.to_bytes())
    raw["files"][0]["path"] = "../../escape"
    with pytest.raises(ManifestError):
        sign_manifest(raw, key)


def test_inconsistent_chunk_list_refused(tmp_path: Path) -> None:
    key = generate_key()
    manifest = build_manifest(
        make_dir(tmp_path), ModelId("tiny", "1"), "llm", key, chunk_size=CHUNK
    )
    raw = json.loads(manifest.to_bytes())
    raw["files"][1]["chunks"].append("0" * 64)
    with pytest.raises(ManifestError):
        parse_manifest(raw)


@pytest.mark.parametrize("blob", [b"", b"[]", b"not json", b'{"format": 2}', b"\xff\xfe"])
def test_garbage_manifest_refused(blob: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(blob)


def test_symlink_in_model_dir_refused(tmp_path: Path) -> None:
    model = make_dir(tmp_path)
    (model / "link").symlink_to(model / "model.onnx")
    with pytest.raises(ManifestError):
        scan_model_dir(model, CHUNK)


def test_key_files_roundtrip_and_trust_dir(tmp_path: Path) -> None:
    key = generate_key()
    save_private_key(key, tmp_path / "pub.key")
    assert (tmp_path / "pub.key").stat().st_mode & 0o777 == 0o600
    assert public_key_hex(load_private_key(tmp_path / "pub.key")) == public_key_hex(key)
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "a.pub").write_text((tmp_path / "pub.key.pub").read_text())
    assert public_key_hex(key) in TrustStore.from_dir(trust_dir)
