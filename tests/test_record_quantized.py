"""A record's own quantized file into a pgolf artifact: `python -m pgolf.tools.reexport final_model.int6.ptz
model=record_1611 ...` reads PR #1611's `final_model.int6.ptz` (its `torch.save({"w", "m"})` through brotli or
xz, byte-shuffled or not, or its `PGRP` per-group container) and writes the codes, scales and LQER factors as
stored, so that `inspect --against` compares them with pgolf's and eval.py scores them.

The record's files are written here from a pgolf artifact by `record_dicts` / `write_*` below, from the
format's description (pgolf/tools/record_quantized.py's docstring: names, categories, groups, manifest)."""

from __future__ import annotations

import io
import json
import lzma
import os
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch
from test_record_weights import tiny_1611_dict

import pgolf.tools.record_quantized as rq
import pgolf.tools.reexport as rx
from pgolf.export.weights import save_float_weights
from pgolf.model.banks import RENAMES
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import ArtifactError, read_artifact
from pgolf.quant.pergroup import lrzip_compress
from pgolf.quant.rules import dequantize_entry
from pgolf.tools.inspect import _differ, diff
from pgolf.tools.record_quantized import _inflate, read_record_quantized, record_entries

BACK = {v: k for k, v in RENAMES.items()}  # pgolf name -> the record's
GROUP_KEYS = ["_tok_emb.weight.q", "attn.c_k.weight.q", "attn.c_q.weight.q", "attn.c_v.weight.q"]
GROUP_KEYS += ["attn.proj.weight.q", "mlp.fc.weight.q", "mlp.proj.weight.q"]
HOT_KEYS = {"_tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q"}
ART = "final_model.sdclip_gptq_record_1611.ptz"
# pgolf's PR #1611 export at the tiny model's size: a short calibration, every matrix through GPTQ
PG_ARGS = ["export.calibration.count=4", "export.calibration.length=16", "export.gptq.batch=2"]
PG_ARGS += ["export.rules.2.max_numel=2048"]


@pytest.fixture(scope="module")
def pgolf_artifact(tmp_path_factory, synth_dir):
    """A tiny_1611 artifact of pgolf's PR #1611 export (SDClip GPTQ int6/int7, int8 gates, LQER asym on 3
    matrices, fp16 passthrough), its directory and the re-export's common arguments."""
    tmp = tmp_path_factory.mktemp("recq")
    model = tiny_1611_dict()
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_dict(model))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p.float()).to(p.dtype) * 0.05)
    save_float_weights(tmp / "pg" / "final_model.float.ptz", m.state_dict(), {"model": model, "seed": 0})
    common = ["data=synthetic", f"data.root={synth_dir.parent}", "export.codec=zstd", "export.level=3"]
    common += ["export.report_codecs=[]", "eval.seq_len=32", "eval.max_tokens=256", "seed=0"]
    args = ["--export", "sdclip_gptq_record_1611", *PG_ARGS, f"out_dir={tmp / 'pg'}"]
    assert rx.main([str(tmp / "pg" / "final_model.float.ptz"), *common, *args]) == 0
    entries = read_artifact(tmp / "pg" / ART)[0]
    assert {e.bits for e in entries.values() if e.kind == "int"} == {6, 7, 8}  # int6, int7 tok_emb, int8 gates
    assert sum(e.lqer is not None for e in entries.values()) == 3
    return tmp, model, entries, common


def reference_dicts(entries) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(w, m) as the record's `gptq_mixed_quantize` returns them, of pgolf's entries."""
    w, m = {}, {}
    for name, e in entries.items():
        rec = BACK.get(name, name)
        if e.kind != "int":
            assert e.kind == "fp16" or not e.data.is_floating_point(), (name, e.kind)
            w[rec], m[rec] = e.data, "passthrough (float16)"
            continue
        if e.bits == 8:  # the attention gates (PR #1611's GATED_ATTN_QUANT_GATE): codes .gq, row scales .gs
            w[rec + ".gq"], w[rec + ".gs"], m[rec] = e.q, e.scale, "gate_int8_row"
            continue
        w[rec + ".q"], w[rec + ".scale"], m[rec] = e.q, e.scale, f"gptq (int{e.bits})"
        if e.lqer is not None:
            f = e.lqer
            w[rec + ".lqA_a"], w[rec + ".lqAs_a"], w[rec + ".lqB_a"], w[rec + ".lqBs_a"] = f.qa, f.sa, f.qb, f.sb
            m[rec] += "+lqer_asym"
    return w, m


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def shuffle(data: bytes, stride: int = 2) -> bytes:
    """The record's byte shuffle: `BSHF`, the stride, then byte j of every stride-sized word, j = 0..stride-1."""
    a = np.frombuffer(data, dtype=np.uint8)
    return b"BSHF" + bytes([stride]) + b"".join(a[j::stride].tobytes() for j in range(stride))


def write_plain(path: Path, w, m, codec: str = "brotli", shuffled: bool = True) -> Path:
    raw = torch_bytes({"w": w, "m": m})
    raw = shuffle(raw) if shuffled else raw
    path.write_bytes(brotli.compress(raw, quality=5) if codec == "brotli" else lzma.compress(raw, preset=1))
    return path


def write_pergroup(path: Path, w, m, seed: int = 0) -> Path:
    """The PGRP container: the int8 codes of the 7 role groups (layer order, rows of the hot groups in a
    stored random order, each matrix transposed) through `lrzip -z`, the remainder and the uint16 orders
    through brotli."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list] = {k: [] for k in GROUP_KEYS}
    rest = {}
    for name, t in sorted(w.items()):
        parts = name.split(".")
        key = ".".join(parts[2:]) if parts[0] == "blocks" else "_" + name
        if t.dtype == torch.int8 and key in groups:
            groups[key].append((int(parts[1]) if parts[0] == "blocks" else 0, t))
        else:
            rest[name] = t
    streams, perms, manifest = [], b"", {}
    for key in GROUP_KEYS:
        blob = b""
        for _, t in sorted(groups[key], key=lambda x: x[0]):
            a = t.numpy()
            if key in HOT_KEYS:
                order = rng.permutation(a.shape[0]).astype(np.uint16)
                perms += order.tobytes()
                a = a[order]
            blob += np.ascontiguousarray(a.T).tobytes()
        if groups[key]:
            manifest[key] = [tuple(t.shape) for _, t in sorted(groups[key], key=lambda x: x[0])]
        streams.append(lrzip_compress(blob, 1) if blob else b"")
    streams.append(brotli.compress(torch_bytes({"r": rest, "m": m, "s": manifest}), quality=5))
    streams.append(brotli.compress(perms, quality=5))
    head = b"PGRP" + struct.pack("<I", len(streams)) + b"".join(struct.pack("<I", len(s)) for s in streams)
    path.write_bytes(head + b"".join(streams))
    return path


def same_entries(a, b) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        assert (x.kind, x.shape, x.orig_dtype, x.bits) == (y.kind, y.shape, y.orig_dtype, y.bits), k
        for f in ("data", "q", "scale"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None) == (v is None) and (u is None or (u.dtype == v.dtype and torch.equal(u, v))), (k, f)
        assert (x.lqer is None) == (y.lqer is None), k
        if x.lqer is not None:
            assert (x.lqer.mode, x.lqer.group) == (y.lqer.mode, y.lqer.group), k
            for f in ("qa", "sa", "qb", "sb"):
                assert torch.equal(getattr(x.lqer, f), getattr(y.lqer, f)), (k, f)
        assert torch.equal(dequantize_entry(x), dequantize_entry(y)), k


@pytest.mark.parametrize("codec,shuffled", [("brotli", True), ("brotli", False), ("lzma", True)])
def test_plain_record_files_give_the_stored_entries(pgolf_artifact, tmp_path, codec, shuffled):
    _, model, entries, _ = pgolf_artifact
    w, m = reference_dicts(entries)
    path = write_plain(tmp_path / "final_model.int6.ptz", w, m, codec, shuffled)
    w2, m2, fmt = read_record_quantized(path)
    assert fmt == codec and m2 == m
    if codec == "lzma":  # import without an evaluation: no window length needed, nothing scored
        over = [*pgolf_artifact[3][:2], "eval.enabled=false"]  # the synthetic data, no eval.seq_len
        args = [str(path), "model=tiny_1611", "--export", "int8_zlib", f"out_dir={tmp_path / 'i'}", *over]
        assert rx.main(args) == 0 and "roundtrip" not in json.loads(
            (tmp_path / "i" / "reexport_int8_zlib.json").read_text()
        )
    same_entries(record_entries(w2, m2, model), entries)
    summary = diff(pgolf_artifact[0] / "pg" / ART, path).splitlines()  # inspect --against the record's file
    assert summary[1] == "B: final_model.int6.ptz" and summary[-1].startswith("codes: 0 of ")
    assert "float tensors that differ: 0;" in summary[-1] and summary[-1].count(": same") == 3


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="needs lrzip (bash run.sh setup installs it)")
def test_pergroup_record_file_imports_with_the_same_codes_and_round_trip(pgolf_artifact, tmp_path, capsys):
    """PR #1611's own container into a pgolf artifact: every code, scale and LQER factor as stored, `inspect
    --against` finds no difference, and the round trip scores what pgolf's own artifact scores."""
    tmp, model, entries, common = pgolf_artifact
    w, m = reference_dicts(entries)
    path = write_pergroup(tmp_path / "final_model.int6.ptz", w, m)
    w2, m2, fmt = read_record_quantized(path)
    assert fmt == "pergroup"
    same_entries(record_entries(w2, m2, model), entries)
    out_dir = tmp_path / "imp"
    args = [str(path), "model=tiny_1611", "--export", "sdclip_gptq_record_1611", f"out_dir={out_dir}", *common]
    assert rx.main(args) == 0
    log = capsys.readouterr().out
    assert "the record's quantized final_model.int6.ptz (pergroup, " in log and "code bytes not counted" in log
    imported = out_dir / ART
    same_entries(read_artifact(imported)[0], entries)
    assert diff(imported, tmp / "pg" / ART).splitlines()[-1].startswith("codes: 0 of ")
    res = json.loads((out_dir / "reexport_sdclip_gptq_record_1611.json").read_text())
    ref = json.loads((tmp / "pg" / "reexport_sdclip_gptq_record_1611.json").read_text())
    assert res["roundtrip"]["standard"]["val_bpb"] == ref["roundtrip"]["standard"]["val_bpb"]
    assert res["imported"]["format"] == "pergroup" and res["export"]["code_bytes"] == 0
    meta = read_artifact(imported)[1]
    assert meta["quant"]["imported"]["sha256"] == res["imported"]["sha256"] and "calibration" not in meta
    assert rx.main(args) == 2  # the artifact exists: not overwritten
    assert "exists" in capsys.readouterr().err


def test_bad_record_files_are_one_error_each(pgolf_artifact, tmp_path):
    _, model, entries, _ = pgolf_artifact
    w, m = reference_dicts(entries)
    gate = next(k for k, v in m.items() if v == "gate_int8_row")
    fc = next(k for k, v in m.items() if v.endswith("+lqer_asym") and "mlp" in k)
    codes = dict(w)
    codes["blocks.0.mlp.proj.weight.q"] = codes["blocks.0.mlp.proj.weight.q"].clone().fill_(40)
    cases = {
        "hadamard": (w, {**m, fc: "gptq (int6) +hadamard"}, "is not one PR #1611 writes"),
        "missing": ({k: v for k, v in w.items() if k != gate + ".gs"}, m, rf"{gate}.gs is missing"),
        "left": ({**w, "extra.q": torch.zeros(2, dtype=torch.int8)}, m, r"tensors no category uses: \['extra.q'\]"),
        "unknown": (w, {**m, "blocks.9.attn.c_q.weight": "gptq (int6)"}, "no parameter for"),
        "range": (codes, m, r"blocks.0.mlp.proj.weight.q holds codes outside \[-31, 31\]"),
        "no_entry": (w, {k: v for k, v in m.items() if k != "smear_lambda"}, "no entry for smear_lambda"),
        "lqer": ({**w, fc + ".lqA_a": w[fc + ".lqA_a"].clone().fill_(3)}, m, "qa: codes must lie in"),
    }
    for ww, mm, msg in cases.values():
        with pytest.raises(ArtifactError, match=msg):
            record_entries(ww, mm, model)
    with pytest.raises(
        ArtifactError, match=r"skip_weights must be torch.float16 \[3, 64\], got torch.float16 \[3, 128\]"
    ):
        record_entries(w, m, {**model, "model_dim": 64, "num_heads": 4})  # another model than the file's
    path = write_plain(tmp_path / "x.ptz", w, m)  # brotli: no magic bytes, so it may be anything
    with pytest.raises(ArtifactError, match=r"\(bad magic bytes\); if it is a record's brotli-compressed quantized"):
        rx.import_record_quantized(None, path, None, None, tmp_path, tmp_path / "r.json")
    xz = write_plain(tmp_path / "x_xz.ptz", w, m, "lzma")
    with pytest.raises(ArtifactError, match="x_xz.ptz: a record's quantized file holds no model config: name the"):
        rx.import_record_quantized(None, xz, None, None, tmp_path, tmp_path / "r.json")
    (tmp_path / "junk.ptz").write_bytes(b"\x00junk" * 100)
    with pytest.raises(ArtifactError, match=r"junk.ptz: neither a pgolf artifact \(bad magic bytes\) nor a record"):
        read_record_quantized(tmp_path / "junk.ptz")
    (tmp_path / "cut.ptz").write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ArtifactError, match=r"cut.ptz: truncated brotli stream"):
        read_record_quantized(tmp_path / "cut.ptz")
    with pytest.raises(ArtifactError, match="decompresses to more than 1000 bytes"):
        _inflate(brotli.compress(b"\x00" * 5000), "brotli", cap=1000)
    with pytest.raises(ArtifactError, match="decompresses to more than 1000 bytes"):
        _inflate(lzma.compress(b"\x00" * 5000), "lzma", cap=1000)
    (tmp_path / "intkey.ptz").write_bytes(brotli.compress(torch_bytes({"w": {**w, 5: w[gate + ".gq"]}, "m": m})))
    with pytest.raises(ArtifactError, match="w must map names to tensors: a key '5' is int"):
        read_record_quantized(tmp_path / "intkey.ptz")
    (tmp_path / "mval.ptz").write_bytes(brotli.compress(torch_bytes({"w": w, "m": {**m, gate: 3}})))
    with pytest.raises(ArtifactError, match=rf"must map names to strings: '{gate}' is 3"):
        read_record_quantized(tmp_path / "mval.ptz")
    (tmp_path / "other.ptz").write_bytes(brotli.compress(torch_bytes({"w": w})))
    with pytest.raises(ArtifactError, match=r"expected the record's \{'w': tensors, 'm': categories\}"):
        read_record_quantized(tmp_path / "other.ptz")

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    (tmp_path / "evil.ptz").write_bytes(brotli.compress(torch_bytes({"w": w, "m": Evil()})))
    with pytest.raises(ArtifactError, match="refused by weights-only loading"):
        read_record_quantized(tmp_path / "evil.ptz")


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="needs lrzip (bash run.sh setup installs it)")
def test_bad_pergroup_files_are_one_error_each(pgolf_artifact, tmp_path):
    _, _, entries, _ = pgolf_artifact
    w, m = reference_dicts(entries)
    good = write_pergroup(tmp_path / "good.ptz", w, m).read_bytes()
    n = struct.unpack_from("<9I", good, 8)
    body = 8 + 4 * 9

    def with_stream(i: int, data: bytes) -> bytes:
        lens = list(n)
        lens[i] = len(data)
        starts = [body + sum(n[:j]) for j in range(9)]
        streams = [good[s : s + k] for s, k in zip(starts, n, strict=True)]
        streams[i] = data
        return good[:8] + struct.pack("<9I", *lens) + b"".join(streams)

    perms = np.frombuffer(brotli.decompress(good[body + sum(n[:8]) :]), dtype="<u2").copy()
    perms[1] = perms[0]
    rem = torch.load(io.BytesIO(brotli.decompress(good[body + sum(n[:7]) : body + sum(n[:8])])), weights_only=True)
    bad_shape = {**rem, "s": {**rem["s"], "mlp.proj.weight.q": [(64, 64)] * len(rem["s"]["mlp.proj.weight.q"])}}
    cases = {
        "perm": (with_stream(8, brotli.compress(perms.tobytes())), "layer 0 of tok_emb is not a permutation"),
        "size": (with_stream(7, brotli.compress(torch_bytes(bad_shape))), "lrzip declares .* bytes, the header's"),
        "group": (with_stream(7, brotli.compress(torch_bytes({**rem, "s": {"x": []}}))), r"unknown groups \['x'\]"),
        "cut": (good[:-5], "stream lengths add up to"),
    }
    for what, (data, msg) in cases.items():
        (tmp_path / f"{what}.ptz").write_bytes(data)
        with pytest.raises(ArtifactError, match=msg):
            read_record_quantized(tmp_path / f"{what}.ptz")


@pytest.mark.parametrize("fmt", ["brotli", "lzma", "pergroup"])
def test_a_pgolf_artifact_written_in_the_records_format(pgolf_artifact, tmp_path, capsys, fmt):
    """`python -m pgolf.tools.record_quantized ARTIFACT --out final_model.int6.ptz` writes what the record's
    `serialize` writes (checked here by the format's description, not by the reader), and it reads back."""
    if fmt == "pergroup" and shutil.which("lrzip") is None:
        pytest.skip("needs lrzip (bash run.sh setup installs it)")
    tmp, model, entries, _ = pgolf_artifact
    out = tmp_path / "final_model.int6.ptz"
    assert rq.main([str(tmp / "pg" / ART), "--out", str(out), "--format", fmt]) == 0
    assert f"format:{fmt} bytes:{out.stat().st_size} tensors:{len(entries)} lqer:3" in capsys.readouterr().out
    w, m = reference_dicts(entries)  # the reference of this file
    data = out.read_bytes()
    if fmt != "pergroup":
        state = torch.load(io.BytesIO(brotli.decompress(data) if fmt == "brotli" else lzma.decompress(data)))
        assert state["m"] == m and state["w"].keys() == w.keys()
        assert all(torch.equal(state["w"][k], w[k]) and state["w"][k].dtype == w[k].dtype for k in w)
    else:
        n = struct.unpack_from("<I", data, 4)[0]
        lens = struct.unpack_from(f"<{n}I", data, 8)
        starts = [8 + 4 * n + sum(lens[:i]) for i in range(n)]
        streams = [data[s : s + k] for s, k in zip(starts, lens, strict=True)]
        assert data[:4] == b"PGRP" and n == 9
        rem = torch.load(io.BytesIO(brotli.decompress(streams[7])))
        assert set(rem) == {"r", "m", "s"} and rem["m"] == m
        assert rem["s"]["_tok_emb.weight.q"] == [tuple(w["tok_emb.weight.q"].shape)]
        assert rem["s"]["mlp.fc.weight.q"] == [tuple(w[f"blocks.{i}.mlp.fc.weight.q"].shape) for i in range(5)]
        assert "blocks.0.attn.attn_gate_w.gq" in rem["r"] and "tok_emb.weight.q" not in rem["r"]
        rows = w["tok_emb.weight.q"].shape[0]
        order = np.frombuffer(brotli.decompress(streams[8]), dtype="<u2")[:rows].astype(np.int64)
        assert sorted(order) == list(range(rows)) and order[0] == 0  # the chain starts at row 0
        (tmp_path / "g.lrz").write_bytes(streams[0])
        subprocess.run(["lrzip", "-d", "-Q", "-o", str(tmp_path / "g.bin"), str(tmp_path / "g.lrz")], check=True)
        q = w["tok_emb.weight.q"].numpy()
        assert (tmp_path / "g.bin").read_bytes() == np.ascontiguousarray(q[order].T).tobytes()
    w2, m2, got = read_record_quantized(out)
    assert got == fmt
    same_entries(record_entries(w2, m2, model), entries)
    assert rq.main([str(tmp / "pg" / ART), "--out", str(out)]) == 2  # exists: not replaced
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == data


def test_entries_the_records_format_cannot_hold_are_refused(pgolf_artifact):
    _, _, entries, _ = pgolf_artifact
    e = entries["skip_weights"]
    with pytest.raises(ArtifactError, match="skip_weights is stored fp32: PR #1611's format holds floats only as fp16"):
        rq.record_dicts({**entries, "skip_weights": replace(e, kind="fp32", data=e.data.float())})
    e = entries["blocks.0.mlp.fc.weight"]
    odd = replace(e, scale=torch.full((3,), 0.1, dtype=torch.float16))
    with pytest.raises(ArtifactError, match="a scale of 3 values is neither per row nor one value"):
        rq.record_dicts({**entries, "blocks.0.mlp.fc.weight": odd})


def test_a_records_document_bounded_attention_is_scored_and_recorded(pgolf_artifact, tmp_path, capsys):
    """`eval.doc_max_seg_len=N` (a record's file records no training): the round trip scores document-bounded
    windows (PR #1611 trains and scores so, pieces of 2048), the same as pgolf's artifact of the same codes
    scored so, and the artifact records it for eval.py; weights that record their training refuse it."""
    tmp, _, entries, common = pgolf_artifact
    path = write_plain(tmp_path / "final_model.int6.ptz", *reference_dicts(entries))
    args = ["--export", "sdclip_gptq_record_1611", *common, "eval.doc_max_seg_len=8", "eval.pre_quant=false"]
    assert rx.main([str(path), "model=tiny_1611", f"out_dir={tmp_path / 'imp'}", *args]) == 0
    assert "document-bounded windows (attention stops at BOS and every 8 tokens)" in capsys.readouterr().out
    meta = read_artifact(tmp_path / "imp" / ART)[1]
    assert meta["train"] == {"doc_attention": True, "max_seg_len": 8}
    pg = tmp / "pg" / "final_model.float.ptz"  # pgolf's weights of the same codes, saved without a train record
    assert rx.main([str(pg), f"out_dir={tmp_path / 'pg'}", *args, *PG_ARGS]) == 0
    res = json.loads((tmp_path / "imp" / "reexport_sdclip_gptq_record_1611.json").read_text())
    ref = json.loads((tmp_path / "pg" / "reexport_sdclip_gptq_record_1611.json").read_text())
    plain = json.loads((tmp / "pg" / "reexport_sdclip_gptq_record_1611.json").read_text())
    bpb = res["roundtrip"]["standard"]["val_bpb"]
    assert bpb == ref["roundtrip"]["standard"]["val_bpb"] != plain["roundtrip"]["standard"]["val_bpb"]
    capsys.readouterr()
    save_float_weights(
        tmp_path / "t.ptz",
        {k: dequantize_entry(e) for k, e in entries.items()},
        {"model": tiny_1611_dict(), "train": {"doc_attention": False}},
    )
    assert rx.main([str(tmp_path / "t.ptz"), f"out_dir={tmp_path / 't'}", *args]) == 2
    assert "t.ptz records its training (train.doc_attention: False): eval.doc_max_seg_len is for a record" in (
        capsys.readouterr().err
    )
    assert rx.main([str(path), "model=tiny_1611", f"out_dir={tmp_path / 'z'}", *args, "eval.doc_max_seg_len=0"]) == 2
    assert "eval.doc_max_seg_len must be an integer in 1.." in capsys.readouterr().err


def test_hostile_record_files_are_refused_within_the_models_bounds(pgolf_artifact, tmp_path, monkeypatch):
    """With the model config every decompression is capped at what the model holds (4 bytes a parameter +
    16 MiB), a per-group manifest must list the model's shapes before any group is decoded, an expanded view
    is refused before it is copied, and non-finite values are refused."""
    _, model, entries, _ = pgolf_artifact
    w, m = reference_dicts(entries)
    zeros = b"\0" * (32 << 20)  # over tiny_1611's cap (about 20 MB), far under the 1 GiB one
    (tmp_path / "bomb.ptz").write_bytes(brotli.compress(zeros, quality=1))
    (tmp_path / "bomb_xz.ptz").write_bytes(lzma.compress(zeros, preset=0))
    for name in ("bomb.ptz", "bomb_xz.ptz"):
        with pytest.raises(ArtifactError, match=r"decompresses to more than 2\d{7} bytes"):
            rq.load_record_entries(tmp_path / name, model)
    expanded = {"w": {**w, "junk.q": torch.zeros(1, dtype=torch.int8).expand(1 << 20)}, "m": m}
    (tmp_path / "view.ptz").write_bytes(brotli.compress(torch_bytes(expanded)))
    with pytest.raises(ArtifactError, match=r"a tensor of shape \[1048576\] is larger than its stored bytes"):
        rq.load_record_entries(tmp_path / "view.ptz", model)
    for key in ("tok_emb.weight.scale", "skip_weights"):
        bad = {**w, key: w[key].clone().fill_(float("nan"))}
        with pytest.raises(ArtifactError, match=rf"{key} holds non-finite values"):
            record_entries(bad, m, model)
    rest = {k: v for k, v in w.items() if not (k.endswith(".q") and v.dtype == torch.int8 and "gate" not in k)}
    manifest = {"attn.c_k.weight.q": [(32768, 32768)]}  # 1 GiB of codes the model has no room for
    streams = [b"x"] * 7 + [brotli.compress(torch_bytes({"r": rest, "m": m, "s": manifest})), b""]
    head = b"PGRP" + struct.pack("<10I", 9, *map(len, streams))
    (tmp_path / "pg.ptz").write_bytes(head + b"".join(streams))
    with pytest.raises(ArtifactError, match=r"shape manifest of c_k: \[\(32768, 32768\)\] \(1 layers\) is not the"):
        rq.load_record_entries(tmp_path / "pg.ptz", model)
    manifest = {"attn.c_k.weight.q": [tuple(w[f"blocks.{i}.attn.c_k.weight.q"].shape) for i in range(5)]}
    streams[7] = brotli.compress(torch_bytes({"r": rest, "m": m, "s": manifest}))
    head = b"PGRP" + struct.pack("<10I", 9, *map(len, streams))
    (tmp_path / "pg.ptz").write_bytes(head + b"".join(streams))
    monkeypatch.setenv("PATH", str(tmp_path))  # no lrzip
    with pytest.raises(ArtifactError, match="reading the record's pergroup file needs the external program lrzip"):
        rq.load_record_entries(tmp_path / "pg.ptz", model)
    with pytest.raises(ArtifactError, match="needs the external program lrzip.*or write --format brotli or lzma"):
        rq.encode_record_quantized(entries, "pergroup")


def test_writer_refusals_messages_and_nan_differences(pgolf_artifact, tmp_path, capsys):
    tmp, model, entries, _ = pgolf_artifact
    name, e = next((k, v) for k, v in entries.items() if v.lqer is not None)
    sym = replace(e.lqer, mode="sym", bits=6, group=0)  # export.lqer.asym=false export.lqer.factor_bits=6
    with pytest.raises(ArtifactError, match="symmetric LQER factors of 6 bits; PR #1611's format holds only INT4"):
        rq.record_dicts({**entries, name: replace(e, lqer=sym)})
    nan = torch.tensor([float("nan"), 1.0, float("nan")])
    assert _differ(nan, torch.tensor([1.0, 1.0, float("nan")]))[0] == 1  # NaN against a number differs
    save_float_weights(tmp_path / "f.ptz", {k: dequantize_entry(v) for k, v in entries.items()}, {"model": model})
    assert rq.main([str(tmp_path / "f.ptz"), "--out", str(tmp_path / "o.ptz")]) == 2
    assert "saved float weights, not a quantized artifact: quantize them first" in capsys.readouterr().err
    (tmp_path / "d.ptz").mkdir()
    assert rx.main([str(tmp_path / "d.ptz"), "model=tiny_1611", *pgolf_artifact[3]]) == 2
    assert "d.ptz: a directory, not a weights file" in capsys.readouterr().err
    odd = tmp_path / "a,b it's.ptz"  # a file name Hydra's override grammar would split or choke on unquoted
    write_plain(odd, *reference_dicts(entries))
    args = [str(odd), "model=tiny_1611", "--export", "sdclip_gptq_record_1611", f"out_dir={tmp_path / 'o'}"]
    assert rx.main([*args, *pgolf_artifact[3], "eval.enabled=false"]) == 0
    assert (tmp_path / "o" / ART).is_file()


def test_inspect_counts_tensors_stored_differently(pgolf_artifact, tmp_path):
    """A matrix int6 + LQER in A but fp16 in B: the summary counts it as stored differently and names the
    LQER factors only A has (it said `0 of N differ ... LQER: none` before)."""
    tmp, _, entries, _ = pgolf_artifact
    name = next(k for k, v in entries.items() if v.lqer is not None)
    w, m = reference_dicts(entries)
    for k in [k for k in w if k.startswith(name + ".")]:
        del w[k]
    w[name], m[name] = dequantize_entry(entries[name]).half(), "passthrough (float16)"
    path = write_plain(tmp_path / "final_model.int6.ptz", w, m)
    summary = diff(tmp / "pg" / ART, path).splitlines()[-1]
    assert "stored differently: 1;" in summary and f"{name}: only A" in summary
