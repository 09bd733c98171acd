"""Download the challenge's FineWeb export: `python -m pgolf.tools.fineweb --variant sp1024 --train-shards N`.

The published export lives in the Hugging Face dataset `willdepueoai/parameter-golf` under `datasets/`
and is manifest-driven (DATA): `datasets/manifest.json` lists `datasets` (name `fineweb10B_<variant>`,
`tokenizer_name`, `stats.files_train` / `stats.files_val`) and `tokenizers` (name, `model_path`,
`vocab_path`). Shards are `datasets/datasets/<name>/fineweb_{train,val}_NNNNNN.bin`. This command reads the
manifest, then fetches all validation shards, the first N training shards and the tokenizer into
`--out` (default `data/`: `data/datasets/<name>/`, `data/tokenizers/`). Files already present are kept;
each download goes to a temporary file and is renamed only when complete and validated (shard header and
size). Offline, it stops with a message saying the hub cannot be reached.

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
from pathlib import Path

from pgolf.data.shards import ShardError, read_shard_header
from pgolf.io import atomic_path

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
DEFAULT_ENDPOINT = "https://huggingface.co"
VARIANTS = ("sp1024", "sp8192")


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
    """Remote paths to fetch (val shards, first N train shards, tokenizer files) and the dataset entry."""
    name = f"fineweb10B_{variant}"
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
    files = [f"{REMOTE_ROOT}/datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    files += [f"{REMOTE_ROOT}/datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [f"{REMOTE_ROOT}/{tok[k]}" for k in ("model_path", "vocab_path") if tok.get(k)]
    return files, entry


def download(
    variant: str = "sp1024",
    train_shards: int = 80,
    out: str | Path = "data",
    endpoint: str | None = None,
    repo: str = REPO_ID,
    log=print,
) -> Path:
    if variant not in VARIANTS:
        raise DownloadError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    endpoint = endpoint or os.environ.get("PGOLF_HF_ENDPOINT", DEFAULT_ENDPOINT)
    out = Path(out)
    manifest_file = out / "manifest.json"
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
    return out / "datasets" / entry["name"]


def _valid_shard(path: Path) -> bool:
    try:
        read_shard_header(path)
        return True
    except ShardError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.fineweb", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="sp1024", choices=VARIANTS)
    ap.add_argument("--train-shards", type=int, default=80, help="first N training shards (10^8 tokens each)")
    ap.add_argument("--out", default="data")
    ap.add_argument("--endpoint", default=None, help=f"hub base URL (default {DEFAULT_ENDPOINT})")
    ap.add_argument("--repo", default=REPO_ID)
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
