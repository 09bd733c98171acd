"""Pack an experiment into one self-contained `train_gpt.py`, the file the challenge counts and runs.

    python -m pgolf.tools.pack experiment=record_1263 [key=value ...] --out DIR

composes and validates the config exactly as `train.py` does (conf/, pgolf/config/), and writes
`DIR/train_gpt.py`: a bootstrap of a few lines, then one string literal holding, brotli-compressed, the
resolved config and the source of every runtime module the run imports (pgolf/tools/packsource.py: found
over the import graph from pgolf/train/standalone.py, docstrings, comments and function annotations removed,
unused top-level definitions dropped, local and module-private names shortened by python-minifier). The
bootstrap installs a meta-path importer over the embedded sources (tracebacks name `train_gpt.py/pgolf/...`
and show the packed lines) and calls `pgolf.train.standalone.main`. The file needs the packages of its
requirements.txt and nothing else: no pgolf install, no conf/. Compressed self-extracting scripts are how the
records ship their code (records/track_10min_16mb/2026-04-03_MuonEqR_DepthRecurrence_WD090_AllInt6: lzma +
base85; the final leaderboard's #1, PR #1611: python-minifier + brotli-11 + base85; brotli is 2-3% smaller
than lzma here).
The literal uses a 109-letter ASCII alphabet instead of base85 (`ALPHABET`): 1.1875 bytes per compressed
byte instead of 1.25, about 5% off every packed file.

Only what the experiment needs is packed: the eval modes of `final_eval.modes` (a mode that another's
settings name counts; and `standard`, which the export's float diagnostic runs; the other modes are neither
registered nor packed, even where their module is), and the optional parts of the runtime
(pgolf/optional.py: full GPTQ and its calibration, pruning, W&B, weight averaging) that
pgolf/config/runtime.py's `PART_RULES` say the config uses; the registration imports of the other mode and
part modules are left out of the packed copies of the modules that import them.

The packed config is the recipe. What differs between the runs of one recipe is reset so that they share
one file and one code hash: the seed, resume and variant, the logger (none: the log is
`logs/{RUN_ID}.txt`), the progress bar, checkpointing and extra callbacks (the values of a plain
conf/train.yaml), the data folders (`./data/datasets/<shard folder>`, `./data/tokenizers/<tokenizer>`: the
reference's defaults, moved by `DATA_PATH` / `TOKENIZER_PATH`) and the process layout (devices and nodes
come from torchrun; with several processes the run uses `distributed_strategy`, the trainer's own DDP
settings or those of conf/trainer/ddp.yaml / ddp_cpu.yaml). `train.py` packs its config the same way, in
memory, and records the file's length and sha256 as its code (pgolf/export/code.py).
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import importlib
import importlib.metadata
import json
import re
import sys
import time
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import brotli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pgolf import optional
from pgolf.config.runtime import PART_RULES, check_runtime, run_modes
from pgolf.config.schema import TrainRun
from pgolf.config.typed import ConfigError, floats_as_declared
from pgolf.config.validate import check_overrides, exit_on_config_error, plain, validate_train
from pgolf.eval.modes import get_mode, mode_names
from pgolf.export.code import code_record, package_versions, project_root, requirement_pins
from pgolf.io import atomic_write_bytes
from pgolf.tools import packsource
from pgolf.tools.packsource import (
    CACHE_CHECK,
    MINIFIER_VERSION,
    WORD,
    Module,
    PackError,
    cache_dir,
    collect,
    minify,
    runtime_modules,
    scan_imports,
)

ENTRY = "pgolf.train.standalone"
ENTRY_FUNCTION = "main"  # what the bootstrap calls: ENTRY.main(payload, script path)
MODES_MODULE = "pgolf.eval.modes"  # imports every eval mode module (each registers its modes)
SCRIPT = "train_gpt.py"
ABSOLUTE_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/])")  # POSIX, home, Windows drive
ALWAYS_MODES = ("standard",)  # the export's float diagnostic (pre_quant) runs the standard mode
# The keys reset to the values of a plain conf/train.yaml: they differ between runs of one recipe.
RUN_KEYS = ("seed", "resume", "variant", "callbacks.progress", "callbacks.progress_every_seconds")
RUN_KEYS += ("callbacks.checkpoint", "callbacks.extra")
BROTLI = {"quality": 11, "lgwin": 24}  # the strongest setting
BOOTSTRAP_PACKAGES = ("brotli",)  # what the bootstrap itself imports beyond the standard library
# The payload's text encoding: base-109 digits over the characters a "..." literal holds in one UTF-8 byte
# that no terminal acts on and no line splitter breaks at: printable ASCII but `"` and `\`, the tab, and the
# C0 controls terminals ignore (not BEL, BS, LF, VT, FF, CR, SO, SI, CAN, SUB, ESC, nor ENQ, which some
# terminals answer; not \x1c-\x1e, which str.splitlines breaks at). 19 characters carry 16 bytes
# (109**19 >= 256**16): 1.1875 characters per byte against base85's 1.25. A CRC-32 of the compressed bytes
# makes a damaged file stop with one line instead of running different code.
SAFE_CONTROLS = (1, 2, 3, 4, 6, *range(16, 24), 25, 31, 9)
ALPHABET = "".join(chr(i) for i in (*SAFE_CONTROLS, *range(32, 127)) if chr(i) not in '"\\')
CHUNK_CHARS, CHUNK_BYTES = 19, 16
BOOTSTRAP = """import importlib.abc as A,importlib.util as U,json,sys,zlib
try:import brotli
except ModuleNotFoundError as e:sys.exit(f"{__file__}: {e}: pip install -r requirements.txt")
B="{alphabet}"
P="{payload}";D=bytearray()
try:
 for j in range(0,len(P),{k}):D+=sum(B.find(c)*{base}**i for i,c in enumerate(P[j:j+{k}])).to_bytes({w},"little")
 D=D[:{length}]
 if zlib.crc32(D)!={crc}:raise ValueError
except Exception:sys.exit(__file__+": the embedded code is damaged (payload checksum); pack it again")
M,*S=brotli.decompress(D).decode().split("\\0")
M=json.loads(M);S=dict(s.split("\\n",1)for s in S)
class L(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  k=n if n in S else n+".__init__"
  if k in S:
   p=U.spec_from_loader(n,s,origin=__file__+"/"+k.replace(".","/")+".py",is_package=k!=n);p.has_location=1;return p
 def get_source(s,n):return S.get(n,S.get(n+".__init__"))
 def exec_module(s,m):exec(compile(s.get_source(m.__name__),m.__file__,"exec"),m.__dict__)
sys.meta_path.insert(0,L())
if __name__=="__main__":
 try:E=__import__(M["entry"],fromlist=["_"])
 except ModuleNotFoundError as e:sys.exit(f"{__file__}: {e}: pip install -r requirements.txt")
 sys.exit(E.{entry_function}(M,__file__))
"""


def encode_payload(blob: bytes) -> str:
    """`blob` as text of `ALPHABET` (the bootstrap's decoder is its inverse): zero-padded to whole chunks of
    `CHUNK_BYTES`, each read as a little-endian integer and written as `CHUNK_CHARS` base-109 digits, least
    significant first. The length and CRC-32 of `blob` are written into the bootstrap."""
    pad = -len(blob) % CHUNK_BYTES
    data = blob + bytes(pad)
    out = []
    for j in range(0, len(data), CHUNK_BYTES):
        n = int.from_bytes(data[j : j + CHUNK_BYTES], "little")
        for _ in range(CHUNK_CHARS):
            n, d = divmod(n, len(ALPHABET))
            out.append(ALPHABET[d])
    return "".join(out)


def bootstrap(blob: bytes) -> str:
    """The packed file's text for the compressed payload `blob`: `BOOTSTRAP` with the encoding's constants, the
    alphabet, the payload's length and CRC-32, the entry function and the encoded payload (last: its text may
    hold any `{...}`)."""
    fill = {"k": CHUNK_CHARS, "base": len(ALPHABET), "w": CHUNK_BYTES, "length": len(blob)}  # k chars -> w bytes
    fill |= {"crc": zlib.crc32(blob), "entry_function": ENTRY_FUNCTION, "alphabet": ALPHABET}
    text = BOOTSTRAP
    for key, value in fill.items():
        text = text.replace("{" + key + "}", str(value))
    return text.replace("{payload}", encode_payload(blob))


def decode_payload(text: str, length: int) -> bytes:
    """The inverse of `encode_payload`: the first `length` bytes. Raises ValueError for a character outside
    `ALPHABET` or a text that is not whole chunks."""
    if len(text) % CHUNK_CHARS:
        raise ValueError(f"payload of {len(text)} characters is not whole chunks of {CHUNK_CHARS}")
    index = {c: i for i, c in enumerate(ALPHABET)}
    out = bytearray()
    for j in range(0, len(text), CHUNK_CHARS):
        try:
            n = sum(index[c] * len(ALPHABET) ** i for i, c in enumerate(text[j : j + CHUNK_CHARS]))
        except KeyError as e:
            raise ValueError(f"payload character {e.args[0]!r} is outside the alphabet") from None
        out += n.to_bytes(CHUNK_BYTES, "little")
    return bytes(out[:length])


@dataclass(frozen=True)
class Packed:
    """A packed experiment: the file's bytes, the modules it holds, its config and requirements."""

    script: bytes
    modules: tuple[str, ...]
    payload: dict  # the bootstrap's `M`: entry, config, distributed_strategy, requirements
    seconds: float

    @property
    def code(self) -> dict:
        """The code record: `{"bytes", "sha256"}` of the file (pgolf/export/code.py)."""
        return code_record(self.script)

    @property
    def requirements(self) -> dict[str, str]:
        """{distribution: installed version} of the third-party packages the packed modules import."""
        return package_versions(self.payload["requirements"])


def conf_dir() -> Path:
    return project_root() / "conf"


def compose_conf(overrides: list[str] = ()) -> DictConfig:
    """conf/train.yaml composed with `overrides`: inside a Hydra app (train.py) with its search path,
    else with conf/ of this checkout."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def compose_train(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, validated as train.py validates it. Raises ConfigError."""
    cfg = compose_conf(overrides)
    validate_train(cfg, conf_dir())
    check_runtime(cfg)
    return cfg


@cache
def _plain_train() -> dict:
    return plain(compose_conf())


@cache
def _ddp_strategy(accelerator: str):
    name = "ddp_cpu" if accelerator == "cpu" else "ddp"
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "trainer" / f"{name}.yaml").strategy)


def packed_config(cfg: DictConfig | dict) -> tuple[dict, object]:
    """(the recipe of `cfg` as the packed file holds it, the strategy of a multi-process run); see the module
    docstring for what is reset."""
    d = copy.deepcopy(plain(cfg) if isinstance(cfg, DictConfig) else cfg)
    d.pop("hydra", None)
    d = floats_as_declared(TrainRun, d)  # `model.mlp_mult=2` and `=2.0`: one recipe, one file
    base = _plain_train()
    for key in RUN_KEYS:
        node, ref, *path = d, base, *key.split(".")
        for part in path[:-1]:
            node, ref = node[part], ref[part]
        node[path[-1]] = copy.deepcopy(ref[path[-1]])
    d["logger"] = {"kind": "none", "extra": {}}
    data = d["data"]
    shard_dir, tok = Path(data["dir"]).name, Path(data["tokenizer_path"]).name
    data.update(root="./data", dir=f"${{data.root}}/datasets/{shard_dir}", prepare=None)
    data.update(tokenizer_path=f"${{data.root}}/tokenizers/{tok}")
    for k in ("train_pattern", "val_pattern", "val_bytes_pattern"):
        if data.get(k) is not None:
            data[k] = f"${{data.dir}}/{Path(data[k]).name}"
    tr = d["trainer"]
    strategy = tr["strategy"] if isinstance(tr["strategy"], dict) else _ddp_strategy(tr["accelerator"])
    tr.update(devices=1, num_nodes=1, strategy="auto")
    check_no_machine_paths(d)
    return d, strategy


def check_no_machine_paths(node, where: str = "") -> None:
    """Refuse a packed config that holds an absolute path (`/…`, `~…`, `C:\\…`) once the data folders were
    reset: the file must run from any folder and goes into a public records folder. Raises PackError naming
    the key."""
    if isinstance(node, dict):
        for k, v in node.items():
            check_no_machine_paths(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_no_machine_paths(v, f"{where}[{i}]")
    elif isinstance(node, str) and ABSOLUTE_PATH.match(node):
        raise PackError(
            f"{where} = {node!r} is an absolute path; a packed {SCRIPT} must run from any folder and is published: "
            "give the value at run time (a key=value argument or an environment variable) instead"
        )


def mode_modules(keys: dict[str, Path]) -> dict[str, str]:
    """{eval mode: the runtime module that registers it}: of the modules pgolf/eval/modes.py imports, the
    one that defines the mode's run function, settings class or rule. Raises PackError when none does."""
    registry = Module(MODES_MODULE, ast.parse(keys[MODES_MODULE].read_text(encoding="utf-8")))
    scan_imports(registry, keys)
    candidates = registry.imports
    out = {}
    for name in mode_names():
        m = get_mode(name)
        owners = [f.__module__ for f in (m.run, m.settings, m.rule) if f.__module__ in candidates]
        if not owners:
            raise PackError(f"cannot tell which module of {MODES_MODULE} registers eval mode {name!r}")
        out[name] = owners[0]
    return out


def needed_modes(config: dict) -> set[str]:
    """The eval modes of `final_eval.modes` (names the packed file's check requires registered), those they
    run (`run_modes`: a mode named by another's settings) and `ALWAYS_MODES`."""
    return {*config["final_eval"]["modes"], *run_modes(config["final_eval"]), *ALWAYS_MODES}


def dropped_modes(config: dict, keys: dict[str, Path]) -> set[str]:
    """The mode modules (`pgolf.eval.slot`) that register none of the modes the run uses."""
    owners = mode_modules(keys)
    return set(owners.values()) - {owners[m] for m in needed_modes(config)}


def part_modules() -> dict[str, str]:
    """{optional part: the runtime module that registers it} (pgolf/optional.py), the entry's imports loaded
    first so that every part is registered. Raises PackError for a part of `PART_RULES` nobody registers."""
    importlib.import_module(ENTRY)
    missing = sorted(set(PART_RULES) - set(optional.PARTS))
    if missing:
        raise PackError(f"optional parts {missing} have a rule in PART_RULES but no module registers them")
    return {name: optional.owner(name) for name in PART_RULES}


def dropped_parts(config: dict) -> set[str]:
    """The modules of the optional parts the config does not use (none of their parts is needed)."""
    owners = part_modules()
    need = {owners[name] for name, rule in PART_RULES.items() if rule(config)}
    return set(owners.values()) - need


def config_words(config) -> set[str]:
    """Identifier-like words of the config's strings (a `_target_` may name a runtime class)."""
    return set(WORD.findall(json.dumps(config)))


@cache
def _distributions_by_name() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(tops: set[str]) -> list[str]:
    """The distributions (PyPI names) that provide the top-level import names `tops`."""
    dists = _distributions_by_name()
    return sorted({(dists.get(t) or [t])[0] for t in tops})


def packed_modules(config: dict, keys: dict[str, Path]) -> dict[str, Module]:
    """The runtime modules (of `keys`, `runtime_modules`) a run of the packed `config` imports, without the
    eval modes and optional parts it does not use (`collect`). Raises PackError."""
    unused = set(mode_names()) - needed_modes(config)
    return collect(ENTRY, keys, dropped_modes(config, keys) | dropped_parts(config), unused)


def extra_refs(config: dict) -> set[str]:
    """The names the packed code is used by from outside: the config's words and the bootstrap's entry."""
    return config_words(config) | {ENTRY_FUNCTION}


def pack_key(config: dict, strategy, keys: dict[str, Path]) -> str:
    """The sha256 of everything a pack is made of: the packed config and strategy, every runtime file's
    contents (`keys`), the packer's own source, and the versions of Python, the minifier and brotli."""
    h = hashlib.sha256()
    for part in (json.dumps([config, strategy], sort_keys=True, default=repr), sys.version, MINIFIER_VERSION):
        h.update(part.encode() + b"\0")
    h.update(f"{brotli.version}\0{BROTLI}\0".encode())
    for f in (Path(__file__), Path(packsource.__file__)):
        h.update(f.read_bytes() + b"\0")
    for k in sorted(keys):
        h.update(k.encode() + b"\0" + keys[k].read_bytes() + b"\0")
    return h.hexdigest()


def _cached_script(key: str) -> bytes | None:
    """The packed file of `key` from the cache (`cache_dir().parent / "pack"`), or None: absent, unreadable or
    failing its checksum line."""
    try:
        data = (cache_dir().parent / "pack" / f"{key}.py").read_bytes()
    except OSError:
        return None
    script, _, check = data.rpartition(CACHE_CHECK.encode())
    return script if check == hashlib.sha256(script).hexdigest().encode() + b"\n" else None


def _cache_script(key: str, script: bytes) -> None:
    try:
        path = cache_dir().parent / "pack" / f"{key}.py"
        atomic_write_bytes(path, script + CACHE_CHECK.encode() + hashlib.sha256(script).hexdigest().encode() + b"\n")
    except OSError:
        pass  # an unwritable cache: the next pack is made again


def pack(cfg: DictConfig | dict, root: Path | None = None, use_cache: bool = True) -> Packed:
    """Pack the validated config `cfg` (a composed conf/train.yaml) with the runtime under `root` (default:
    this checkout). Raises PackError (pgolf/tools/packsource.py) when the runtime cannot be packed.

    A pack is a pure function of its inputs (`pack_key`); the file is kept in the cache beside the
    minifier's and read back when the inputs recur (every train.py run packs its experiment: ~0.8 s made,
    a few ms read); `use_cache=False` makes it afresh and leaves the cache alone (bench/pack_bench.py
    times that)."""
    t0 = time.perf_counter()
    config, strategy = packed_config(cfg)
    keys = runtime_modules(root or project_root())
    key = pack_key(config, strategy, keys)
    script = _cached_script(key) if use_cache else None
    if script is not None:
        payload, sources = unpack(script)
        return Packed(script, tuple(sources), payload, time.perf_counter() - t0)
    modules = packed_modules(config, keys)
    sources = minify(modules, extra_refs(config))
    payload = {
        "entry": ENTRY,
        "config": config,
        "distributed_strategy": strategy,
        "requirements": distributions(set(BOOTSTRAP_PACKAGES).union(*(m.external for m in modules.values()))),
    }
    text = "\0".join(
        [json.dumps(payload, sort_keys=True, separators=(",", ":"))] + [f"{k}\n{s}" for k, s in sources.items()]
    )
    blob = brotli.compress(text.encode(), **BROTLI)
    script = bootstrap(blob).encode()
    if use_cache:
        _cache_script(key, script)
    return Packed(script, tuple(sources), payload, time.perf_counter() - t0)


def unpack(script: bytes) -> tuple[dict, dict[str, str]]:
    """(the payload, {module key: packed source}) of a packed train_gpt.py, read as its bootstrap reads it.
    Raises ValueError for a file the packer did not write."""
    m = re.search(r'^P="([^"]*)";', script.decode(errors="replace"), re.M)
    n = re.search(rb"D=D\[:(\d+)\]", script)
    if m is None or n is None:
        raise ValueError(f"not a packed {SCRIPT}: no payload")
    head, *mods = brotli.decompress(decode_payload(m[1], int(n[1]))).decode().split("\0")
    return json.loads(head), dict(s.split("\n", 1) for s in mods)


def compose_command(overrides: list[str]) -> DictConfig:
    """`compose_train` for the command line: a misspelled key is named before Hydra composes (as train.py
    does, `check_overrides`), a sweep (`seed=1,2`, `range(...)`) is refused (a pack is of one config) and
    Hydra's own errors (an unknown `experiment=`, a syntax error) become one line. Raises ConfigError."""
    check_overrides(overrides, TrainRun, conf_dir())
    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parsed = parser.parse_overrides([arg])
        except OverrideParseException as e:
            raise ConfigError(f"{arg}: {str(e).splitlines()[0]}") from None
        if any(o.is_sweep_override() for o in parsed):
            raise ConfigError(f"{arg} is a sweep; a pack is of one config: give each key one value")
    try:
        return compose_train(overrides)
    except MissingConfigException as e:  # an unknown group option: Hydra lists the options over many lines
        options = f" (one of {' | '.join(e.options)})" if e.options else ""
        raise ConfigError(str(e).splitlines()[0] + options) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None


def out_problem(out: Path) -> str | None:
    """Why `out` cannot be the output folder (it, or the nearest of its parents that exists, is not a
    folder), else None."""
    for p in (out, *out.parents):
        if p.exists():
            return None if p.is_dir() else f"--out {out}: {p} is a file, not a folder"
    return None


def main(argv: list[str] | None = None) -> int:
    """The command: pack, refuse to replace a different file unless --force, write. Config problems are
    `config error: ...` (exit status 2), the others `error: ...` (2); nothing is written after either."""
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (experiment=record_1263 ...)")
    ap.add_argument(
        "--out", required=True, help="the folder to write train_gpt.py and requirements.txt into (created if absent)"
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="replace a train_gpt.py or requirements.txt in --out that differs from the pack (without it the "
        "pack refuses, naming the file; an identical file is rewritten either way)",
    )
    ap.add_argument("--modules", action="store_true", help="also list the packed modules")
    args = ap.parse_args(argv)
    out = Path(args.out)
    problem = out_problem(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with exit_on_config_error():
        cfg = compose_command(args.overrides)
    try:
        packed = pack(cfg)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reqs = requirement_pins(packed.requirements)
    files = {out / SCRIPT: packed.script, out / "requirements.txt": "".join(f"{r}\n" for r in reqs).encode()}
    for path, data in files.items():
        if path.exists() and not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2
        if path.exists() and not args.force and path.read_bytes() != data:
            print(f"error: {path} exists and differs from this pack; give --force to replace it", file=sys.stderr)
            return 2
    try:
        for path, data in files.items():
            atomic_write_bytes(path, data)
    except OSError as e:
        print(f"error: --out {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    c = packed.code
    print(f"{out / SCRIPT}: {c['bytes']} bytes sha256:{c['sha256']} ({cfg.name}, {len(packed.modules)} modules)")
    print(f"{out / 'requirements.txt'}: {' '.join(reqs)}")
    print(f"pack_time: {packed.seconds:.2f}s")
    if args.modules:
        print("\n".join(packed.modules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
