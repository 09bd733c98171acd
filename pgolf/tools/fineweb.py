"""Download the challenge's FineWeb export: `python -m pgolf.tools.fineweb --variant sp1024 --train-shards N`.

The published export lives in the Hugging Face dataset `willdepueoai/parameter-golf` under `datasets/`
and is manifest-driven (DATA): `datasets/manifest.json` lists `datasets` (name `fineweb10B_<variant>`,
`tokenizer_name`, `stats.files_train` / `stats.files_val`) and `tokenizers` (name, `model_path`,
`vocab_path`). Shards are `datasets/datasets/<name>/fineweb_{train,val}_NNNNNN.bin`. This command reads the
manifest, then fetches all validation shards, the first N training shards and the tokenizer into
`--out` (default `data/`: `data/datasets/<name>/`, `data/tokenizers/`). Files already present are kept;
each download goes to a temporary file and is renamed only when complete and validated (shard header and
size). Offline, it stops with a message saying the hub cannot be reached.

`--variant sp8192_caseops`: the CaseOps SP8192 data of the final #1 record (PR #1611,
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611; transform and
tokenizer PR #1729), the dataset `romeerp/parameter-golf-caseops-v1` laid out the same way (dataset
`fineweb10B_sp8192_lossless_caps_caseops_v1_reserved`, tokenizer
`fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model`), whose validation shards each come with a byte
sidecar `fineweb_val_bytes_NNNNNN.bin` (BPB counts the original bytes it holds: pgolf/data/stream.py). The
sidecars are fetched with the validation shards: `stats.files_val_bytes` of them when the manifest gives the
count, else one per validation shard. The tokenizer must hold the CaseOps control pieces. The hub's manifest
of a repository other than the default one is kept as `manifest.<owner>__<name>.json`, so that downloads
from two repositories into one `--out` do not overwrite each other's.

`--endpoint` (or `PGOLF_HF_ENDPOINT`) points it at a mirror; the tests use a local fake of the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pgolf.data import caseops
from pgolf.data.shards import ShardError, read_shard_header, sidecar_name
from pgolf.io import atomic_path

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class Variant:
    """A published dataset: the hub repository, the dataset's name in its manifest, and whether its validation
    shards carry byte sidecars (and its tokenizer the CaseOps pieces)."""

    repo: str
    dataset: str
    caseops: bool = False


VARIANTS = {
    "sp1024": Variant(REPO_ID, "fineweb10B_sp1024"),
    "sp8192": Variant(REPO_ID, "fineweb10B_sp8192"),
    "sp8192_caseops": Variant(
        "romeerp/parameter-golf-caseops-v1", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", caseops=True
    ),
}


class DownloadError(RuntimeError):
    pass


def resolve_url(endpoint: str, repo: str, remote_path: str, revision: str = "main") -> str:
    return f"{endpoint.rstrip('/')}/datasets/{repo}/resolve/{revision}/{remote_path}"


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download url to dest atomically (nothing is left behind on failure)."""
    req = urllib.request.Request(url, headers={"User-Agent": "pgolf-downloader"})
    token = os.environ.get("HF_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f, length=1 << 20)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        host = urllib.request.urlparse(url).netloc
        raise DownloadError(
            f"cannot reach {host} ({getattr(e, 'reason', e)}): this machine seems to be offline or the hub is "
            "blocked; download on a connected machine, or point --endpoint / PGOLF_HF_ENDPOINT at a mirror"
        ) from e
    return dest


def local_path(out: Path, remote_path: str) -> Path:
    """datasets/datasets/X -> out/datasets/X, datasets/tokenizers/X -> out/tokenizers/X."""
    parts = Path(remote_path).parts
    if parts[:1] == (REMOTE_ROOT,):
        parts = parts[1:]
    return out.joinpath(*parts)


def plan(manifest: dict, variant: str, train_shards: int) -> tuple[list[str], dict]:
    """Remote paths to fetch (val shards and their byte sidecars, first N train shards, tokenizer files) and
    the dataset entry. DownloadError when the manifest lacks the dataset or its tokenizer, or has fewer
    training shards than asked for."""
    v = VARIANTS[variant]
    name = v.dataset
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = [d.get("name") for d in manifest.get("datasets", [])]
        raise DownloadError(f"dataset {name} is not in the manifest (it lists {known})")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards < 0 or train_shards > n_train:
        raise DownloadError(f"{variant} has {n_train} training shards; asked for {train_shards}")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    if tok is None:
        raise DownloadError(f"tokenizer {tok_name!r} of {name} is not in the manifest")
    val = [f"fineweb_val_{i:06d}.bin" for i in range(n_val)]
    if v.caseops:
        n_side = int(stats.get("files_val_bytes", n_val))
        if n_side != n_val:
            raise DownloadError(f"{name}: the manifest lists {n_side} byte sidecars for {n_val} validation shards")
        val += [sidecar_name(f) for f in val]
    files = [f"{REMOTE_ROOT}/datasets/{name}/{f}" for f in val]
    files += [f"{REMOTE_ROOT}/datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [f"{REMOTE_ROOT}/{tok[k]}" for k in ("model_path", "vocab_path") if tok.get(k)]
    return files, entry


def manifest_file_name(repo: str) -> str:
    """Where the hub's manifest of `repo` is kept in `--out`: `manifest.json` for the challenge's repository."""
    return "manifest.json" if repo == REPO_ID else f"manifest.{repo.replace('/', '__')}.json"


def download(
    variant: str = "sp1024",
    train_shards: int = 80,
    out: str | Path = "data",
    endpoint: str | None = None,
    repo: str | None = None,
    log=print,
) -> Path:
    """Fetch a variant's validation shards (with their byte sidecars), first `train_shards` training shards and
    tokenizer into `out`; returns the dataset folder. `repo` (default: the variant's) names a mirror
    repository. DownloadError for an unknown variant, an unreachable hub, a manifest without the dataset, a
    file that is not a valid shard, or (CaseOps) a tokenizer without the CaseOps pieces."""
    if variant not in VARIANTS:
        raise DownloadError(f"unknown variant {variant!r}; choose one of {tuple(VARIANTS)}")
    v = VARIANTS[variant]
    repo = repo or v.repo
    endpoint = endpoint or os.environ.get("PGOLF_HF_ENDPOINT", DEFAULT_ENDPOINT)
    out = Path(out)
    manifest_file = out / manifest_file_name(repo)
    fetch(resolve_url(endpoint, repo, f"{REMOTE_ROOT}/manifest.json"), manifest_file)
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise DownloadError(f"{manifest_file}: the hub's manifest is not valid JSON ({e})") from e
    files, entry = plan(manifest, variant, train_shards)
    for i, remote in enumerate(files, 1):
        dest = local_path(out, remote)
        if dest.is_file() and (dest.suffix != ".bin" or _valid_shard(dest)):
            log(f"[{i}/{len(files)}] have {remote}")
            continue
        log(f"[{i}/{len(files)}] fetching {remote}")
        fetch(resolve_url(endpoint, repo, remote), dest)
        if dest.suffix == ".bin" and not _valid_shard(dest):
            bad = dest.with_suffix(".bin.invalid")
            dest.rename(bad)
            raise DownloadError(f"{remote}: downloaded file is not a valid shard; kept as {bad.name} for inspection")
    if v.caseops:
        model = next(local_path(out, f) for f in files if f.endswith(".model"))
        _check_caseops_tokenizer(model)
    return out / "datasets" / entry["name"]


def _check_caseops_tokenizer(model: Path) -> None:
    import sentencepiece as spm

    try:
        caseops.check_tokenizer(spm.SentencePieceProcessor(model_file=str(model)))
    except (caseops.CaseOpsError, OSError, RuntimeError) as e:
        raise DownloadError(f"{model}: the CaseOps variant's tokenizer is not a usable CaseOps model ({e})") from e


def _valid_shard(path: Path) -> bool:
    try:
        read_shard_header(path)
        return True
    except ShardError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.fineweb", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="sp1024", choices=tuple(VARIANTS))
    ap.add_argument("--train-shards", type=int, default=80, help="first N training shards (10^8 tokens each)")
    ap.add_argument("--out", default="data")
    ap.add_argument("--endpoint", default=None, help=f"hub base URL (default {DEFAULT_ENDPOINT})")
    ap.add_argument("--repo", default=None, help="hub repository (default: the variant's)")
    a = ap.parse_args(argv)
    try:
        d = download(a.variant, a.train_shards, a.out, a.endpoint, a.repo)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
