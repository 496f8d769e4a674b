"""``train --data``: packing a text file or a directory of token arrays into one blob, reading it
back on a worker as untrusted bytes, the char GPT on token data, bad input refused at the
submitter (exit 2 before any connection) and a data blob no member serves failing the seat."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from node import training_data as td
from node.training.runner import charlm, data
from node.training.service import SeatFailed, TrainingService
from protocol.errors import ConfigError, LocalProtocolError
from protocol.messages.training import JobSpec
from simulations.nodeprocs import REPO_ROOT


def _tokens_dir(root: Path) -> Path:
    d = root / "toks"
    d.mkdir()
    np.save(d / "b.npy", np.arange(100, 400, dtype=np.uint16) % 61)
    save_file({"ids": torch.arange(0, 300, dtype=torch.int32) % 47}, str(d / "a.safetensors"))
    np.save(d / "c.npy", np.array([], dtype=np.int64))
    (d / "notes.txt").write_text("not an array")
    (d / "sub").mkdir()
    np.save(d / "sub" / "ignored.npy", np.arange(5))
    return d


def test_a_directory_packs_to_one_deterministic_archive_read_in_name_order(tmp_path: Path) -> None:
    d = _tokens_dir(tmp_path)
    a, b = td.pack(d), td.pack(d)
    try:
        assert a.kind == "tokens" and a.name == "toks" and a.files == 3
        assert a.path.read_bytes() == b.path.read_bytes() and a.sha256 == b.sha256
        with tarfile.open(a.path) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == ["a.safetensors", "b.npy", "c.npy"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
        expected = np.concatenate([np.arange(300) % 47, np.arange(100, 400) % 61])
        got = td.read_tokens(a.path)
        assert got.dtype == np.int64 and np.array_equal(got, expected)
        assert np.array_equal(td.read_tokens(d), expected)  # the directory itself reads the same
        assert a.tokens == 600 and a.vocab == 61
        fp = a.fingerprint()
        assert fp["sha256"] == td.sha256_of(a.path) and fp["bytes"] == a.path.stat().st_size
    finally:
        tmp = a.tmp
        a.close()
        b.close()
    assert tmp is not None and not tmp.exists()


def test_a_text_file_is_its_own_blob_and_any_bytes_are_text(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_bytes("héllo wörld\n".encode())
    p = td.pack(f)
    assert (p.path, p.kind, p.size, p.tmp) == (f, "text", f.stat().st_size, None)
    assert p.tokens == len("héllo wörld\n") and p.vocab == len(set("héllo wörld\n"))
    assert td.text_of(b"\xff\xfeab") == "\xff\xfeab"  # not UTF-8: one character per byte
    text, digest = data.read_data_text(f)
    assert text == "héllo wörld\n" and digest == p.sha256


def test_one_array_file_is_token_data(tmp_path: Path) -> None:
    f = tmp_path / "ids.npy"
    np.save(f, np.arange(7, dtype=np.int8))
    p = td.pack(f)
    try:
        assert p.kind == "tokens" and p.files == 1
        assert td.read_tokens(p.path).tolist() == list(range(7))
    finally:
        p.close()


@pytest.mark.parametrize("make, match", [
    (lambda d: None, "no such file"),
    (lambda d: (d / "x").write_bytes(b""), "is empty"),
    (lambda d: (d / "x").mkdir(), "no .npy or .safetensors"),
    (lambda d: ((d / "x").mkdir(), (d / "x" / "r.txt").write_text("hi")), "no .npy or .safetensors"),
    (lambda d: ((d / "x").mkdir(), np.save(d / "x" / "f.npy", np.ones(9, np.float32))), "not integers"),
    (lambda d: ((d / "x").mkdir(), np.save(d / "x" / "b.npy", np.ones(9, bool))), "not integers"),
    (lambda d: ((d / "x").mkdir(), np.save(d / "x" / "m.npy", np.ones((3, 3), np.int32))),
     "not one-dimensional"),
    (lambda d: ((d / "x").mkdir(), np.save(d / "x" / "o.npy", np.array([1, "a"], object), allow_pickle=True)),
     "not integers"),
    (lambda d: ((d / "x").mkdir(), np.save(d / "x" / "e.npy", np.zeros(0, np.int32))), "no tokens"),
    (lambda d: ((d / "x").mkdir(), np.save(d / "x" / "n.npy", np.array([3, -1], np.int32))), "negative"),
    (lambda d: ((d / "x").mkdir(), np.save(d / "x" / "v.npy", np.array([td.MAX_VOCAB], np.int64))),
     "vocabulary"),
    (lambda d: ((d / "x").mkdir(), save_file({"w": torch.ones(4)}, str(d / "x" / "f.safetensors"))),
     "not an integer tensor"),
    (lambda d: ((d / "x").mkdir(), save_file({"a": torch.ones(4, dtype=torch.int64),
                                              "b": torch.ones(4, dtype=torch.int64)},
                                             str(d / "x" / "two.safetensors"))), "exactly one"),
    (lambda d: ((d / "x").mkdir(), (d / "x" / "j.npy").write_bytes(b"junk")), "not a .npy"),
    (lambda d: ((d / "x").mkdir(), (d / "x" / "j.safetensors").write_bytes(struct.pack("<Q", 1 << 40))),
     "header"),
])
def test_bad_data_is_refused_at_the_submitter(tmp_path: Path, make: object, match: str) -> None:
    make(tmp_path)  # type: ignore[operator]
    with pytest.raises(td.DataError, match=match):
        td.pack(tmp_path / "x")


def _tar(path: Path, members: list[tuple[str, bytes]], *, kind: bytes = tarfile.REGTYPE) -> None:
    with tarfile.open(path, "w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(body), kind
            tar.addfile(info, io.BytesIO(body))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_a_worker_reads_the_archive_as_untrusted_bytes(tmp_path: Path) -> None:
    good = _npy(np.arange(10, dtype=np.int32))
    cases = {
        "traversal": [("../x.npy", good)],
        "nested": [("d/x.npy", good)],
        "order": [("b.npy", good), ("a.npy", good)],
        "twice": [("a.npy", good), ("a.npy", good)],
        "suffix": [("a.bin", good)],
        "empty": [],
    }
    for label, members in cases.items():
        path = tmp_path / f"{label}.tar"
        _tar(path, members)
        with pytest.raises(td.DataError):
            td.read_tokens(path)
    link = tmp_path / "link.tar"
    _tar(link, [("a.npy", b"")], kind=tarfile.SYMTYPE)
    with pytest.raises(td.DataError, match="not a flat"):
        td.read_tokens(link)
    short = tmp_path / "short.tar"
    _tar(short, [("a.npy", good[:-8])])  # the header promises 10 elements, the member holds 8
    with pytest.raises(td.DataError, match="do not fit"):
        td.read_tokens(short)
    (tmp_path / "junk.tar").write_bytes(b"\x00junk" * 300)
    with pytest.raises(td.DataError):
        td.read_tokens(tmp_path / "junk.tar")
    ok = tmp_path / "ok.tar"
    _tar(ok, [("a.npy", good), ("b.npy", _npy(np.array([5], np.uint8)))])
    ids, digest = data.read_data_tokens(ok)
    assert ids.tolist() == [*range(10), 5] and digest == td.sha256_of(ok)


def test_the_char_gpt_trains_on_token_data_with_its_vocabulary(tmp_path: Path, tiny: dict[str, str]) -> None:
    p = td.pack(_tokens_dir(tmp_path))
    try:
        job = charlm.make_job({**tiny, "data": str(p.path), "data_kind": "tokens"})
        assert job.model.wte.num_embeddings == 61  # type: ignore[union-attr]
        assert job.config is not None and job.config["data"] == {
            "kind": "tokens", "sha256": p.sha256, "bytes": p.size, "tokens": 600, "vocab": 61}
        assert "data_kind" not in job.config and str(p.path) not in json.dumps(job.config)  # no local path
        assert job.config["vocab"] == 61
        loss = job.loss(job.model, job.batch(0, 0))
        assert torch.isfinite(loss)
        assert job.sample is not None and all(w.isdigit() for w in job.sample(job.model).split())
        wide = charlm.make_job({**tiny, "data": str(p.path), "data_kind": "tokens", "vocab_size": "100"})
        assert wide.model.wte.num_embeddings == 100  # type: ignore[union-attr]
        with pytest.raises(data.DataError, match="past vocab_size"):
            charlm.make_job({**tiny, "data": str(p.path), "data_kind": "tokens", "vocab_size": "50"})
    finally:
        p.close()


def test_the_char_gpt_on_a_text_data_blob(tmp_path: Path, tiny: dict[str, str]) -> None:
    f = tmp_path / "t.txt"
    f.write_bytes(b"abcdefgh\xff" * 60)  # not UTF-8: trains on its bytes
    job = charlm.make_job({**tiny, "data": str(f), "data_kind": "text"})
    assert job.config is not None and job.config["vocab"] == "abcdefgh\xff"
    assert job.config["data"]["sha256"] == td.sha256_of(f) and job.config["data"]["bytes"] == 540
    for bad in ({"data": str(f)}, {"data_kind": "text"}, {"data": str(f), "data_kind": "csv"},
                {"data": str(f), "data_kind": "text", "text": str(f)},
                {"data": str(f), "data_kind": "text", "vocab_size": "9"}):
        with pytest.raises(ValueError):
            charlm.CharConfig.from_options(bad)


def test_the_submitter_length_check_is_the_char_gpts() -> None:
    assert charlm.CharConfig().block_size == td.CHARLM_BLOCK
    for n in range(100, 700, 7):
        config = charlm.CharConfig(block_size=16, shards=8, eval_batches=1, batch_size=2)
        try:
            charlm.CharData(torch.zeros(n, dtype=torch.int64), config, vocab=1)
            fits = True
        except data.DataError:
            fits = False
        assert (td.charlm_fits(n, block=16, shards=8) is None) == fits, n


def test_job_spec_data_fields_are_bounded() -> None:
    JobSpec(steps=1, data=b"\x01" * 32, data_kind="tokens", data_name="d", data_bytes=5,
            data_holders=(b"\x02" * 32,))
    with pytest.raises(LocalProtocolError, match="need data"):
        JobSpec(steps=1, data_name="orphan")
    with pytest.raises(LocalProtocolError):
        JobSpec(steps=1, data=b"\x01" * 32, data_kind="csv")
    with pytest.raises(LocalProtocolError):
        JobSpec(steps=1, data=b"\x01" * 32, data_holders=(b"\x02" * 32,) * 17)


def test_a_data_blob_no_member_serves_fails_the_seat_with_a_typed_error() -> None:
    from node.blobs.service import BlobUnavailable

    asked: list[tuple[bytes, tuple[bytes, ...]]] = []

    class Blobs:
        async def get(self, blob_id: bytes, *, holders: tuple[bytes, ...] = ()) -> Path:
            asked.append((blob_id, holders))
            if blob_id == b"\x01" * 32:
                return Path("/cache/blob")
            raise BlobUnavailable("no live member holds it")

    fake = SimpleNamespace(_blobs=Blobs())
    spec = JobSpec(steps=1, data=b"\x01" * 32, data_kind="tokens", data_name="d", data_holders=(b"\x03" * 32,))
    got = asyncio.run(TrainingService._data_options(fake, spec))  # type: ignore[arg-type]
    assert got == {"data": "/cache/blob", "data_kind": "tokens"} and asked == [(b"\x01" * 32, (b"\x03" * 32,))]
    assert asyncio.run(TrainingService._data_options(fake, JobSpec(steps=1))) == {}  # type: ignore[arg-type]
    with pytest.raises(SeatFailed) as failed:
        asyncio.run(TrainingService._data_options(  # type: ignore[arg-type]
            fake, JobSpec(steps=1, data=b"\x09" * 32, data_name="gone.txt")))
    assert failed.value.type == "DataUnavailable" and "gone.txt" in str(failed.value)


def test_bad_data_exits_2_before_any_connection(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short for 64 shards of 64 characters\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    d = tmp_path / "floats"
    d.mkdir()
    np.save(d / "f.npy", np.ones(5000, np.float32))
    # 127.0.0.1:9 (discard) never answers: a run that got past the checks would fail with 1.
    base = [sys.executable, "-m", "node", "train", "--connect", "127.0.0.1:9", "--steps", "2"]
    for data_arg, words in ((str(tmp_path / "missing.txt"), "no such file"), (str(empty), "is empty"),
                            (str(short), "fewer than the 64 shards"), (str(d), "not integers")):
        proc = subprocess.run([*base, "--data", data_arg], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, (data_arg, proc.stderr)
    proc = subprocess.run([*base, "--data", str(short), "--job-arg", "text=x"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "would name other data" in proc.stderr


def test_the_summary_names_the_data() -> None:
    from node.training_cli import data_summary

    builtin = data_summary(None, JobSpec(steps=1))
    assert builtin["name"] == "shakespeare" and builtin["sha256"] == data.SHAKESPEARE_SHA256
    packed = td.Packed(path=Path("x"), name="x.txt", kind="text", size=3, sha256="ab", tokens=3, vocab=2)
    spec = JobSpec(steps=1, data=b"\x01" * 32, data_name="x.txt", data_bytes=3, data_holders=(b"\x02" * 32,))
    got = data_summary(packed, spec)
    assert got["blob"] == "01" * 32 and got["holders"] == ["02" * 32] and got["name"] == "x.txt"
    json.dumps(got)


def test_config_error_is_the_data_errors_base() -> None:
    assert issubclass(td.DataError, ConfigError) and data.DataError is td.DataError
