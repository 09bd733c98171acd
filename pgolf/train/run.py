"""One training run of a validated config: training, export, round trip. `train.py` and the packed
`train_gpt.py` (pgolf/train/standalone.py) both call `fit`, so the two ways of running an experiment are
the same code and give the same losses, artifact and val_bpb.

What differs between the two callers is handed in: the run directory (Hydra's job directory, or the
current folder), the log file (`train.log`, or the reference's `logs/{RUN_ID}.txt`), where the resolved
config is written, and the code record (pgolf/export/code.py), i.e. the length and sha256 of the packed
`train_gpt.py` that counts against the 16,000,000 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from callbacks import build_callbacks
from callbacks.checkpoint import Terminated, check_resume_config
from callbacks.header import RunHeader
from pgolf.config.typed import ConfigError
from pgolf.config.validate import check_resume
from pgolf.data.shards import ShardError
from pgolf.data.tokenizer import TokenizerError
from pgolf.export.code import CODE_KEY
from pgolf.quant.artifact import SizeReport
from pgolf.runlog import log0, set_log_file
from pgolf.train import build

EXIT_OVER_LIMIT = 3  # the exit status of a run whose artifact is over the limit with export.fail_over_limit
EXIT_CONFIG_ERROR = 2  # the exit status of a config error (pgolf/config/validate.py `exit_on_config_error`)
EXIT_DATA_ERROR = 1  # the exit status of a run stopped by bad data (shards, byte sidecar, tokenizer)
DATA_ERRORS = (ShardError, TokenizerError)


@dataclass(frozen=True)
class Extras:
    """What `prepare` built from the config before any data preparation: the Lightning callbacks of
    `callbacks.extra` and the job's loggers."""

    callbacks: list[L.Callback]
    loggers: list[Logger]


def prepare(cfg: DictConfig, run_dir: str | Path) -> Extras:
    """The checks that need Lightning (trainer keys, the batch layout) or the machine (a CUDA device for
    `trainer.accelerator=gpu`, the export codec's external program, the `resume` checkpoint file: train.py
    checks it before its claim, the packed train_gpt.py here; its run's config, which the resume must train on)
    and the extra callbacks and loggers, before any data is prepared. Raises ConfigError."""
    check_resume(cfg.get("resume"))
    check_resume_config(cfg)
    build.check_lightning_config(cfg)
    build.check_accelerator(cfg)
    build.check_export_codec(cfg)
    return Extras(build.build_extra_callbacks(cfg), build.build_logger(cfg, Path(run_dir)))


def fit(
    cfg: DictConfig,
    run_dir: str | Path,
    extras: Extras,
    code: dict,
    log_file: str | Path,
    config_file: str | Path | None = None,
    requirements: dict[str, str] | None = None,
) -> dict | None:
    """Train, export and round-trip the validated config `cfg` (a composed conf/train.yaml).

    `run_dir` receives the artifact, `results.json`, `checkpoints/` and the CSV metrics; `log_file` the
    reference's log lines; `config_file` (rank 0) the resolved config. `extras` comes from `prepare`.
    `code` is the run's code record (`{"bytes", "sha256"}` of its packed train_gpt.py) and `requirements`
    the versions of the packages that code imports; both go into the artifact's metadata. Returns
    `results.json`'s contents, or None when the run was preempted (no export). A SIGTERM after training or
    during the compile warm-up raises `callbacks.checkpoint.Terminated` (a SystemExit, status 143) after one
    `terminated:` line. Bad
    data (a ShardError or TokenizerError: shards, byte sidecar or tokenizer that do not match, found when
    they are read, at set-up) ends the run with one `data error:` line and SystemExit(EXIT_DATA_ERROR); the
    run directory keeps its log. A resumed checkpoint whose weights are not the config's model (names, shapes,
    dtypes) ends it with one `config error:` line and SystemExit(EXIT_CONFIG_ERROR) before any step."""
    run_dir = Path(run_dir)
    loggers = extras.loggers
    set_log_file(log_file)
    if config_file is not None:
        build.save_resolved_config(cfg, config_file)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    try:
        dm = build.build_datamodule(cfg)
        module, tokenizer = build.build_module(cfg, cfg.data.tokenizer_path)
        meta = {**build.run_meta(cfg, tokenizer), CODE_KEY: dict(code), "requirements": dict(requirements or {})}
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        header = RunHeader(lambda tr, pl: build.log_header(cfg, pl, tr.datamodule, tokenizer, tr.world_size, code))
        challenge = build_callbacks(cfg, run_dir, meta)
        trainer = build.build_trainer(cfg, [header, *challenge.all, *extras.callbacks], loggers)
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.resume)
    except (ConfigError, *DATA_ERRORS) as e:  # the message names the file, or the checkpoint, and the problem
        # a config error found at fit start (a resumed checkpoint that is not this config's model), or bad data
        what, status = ("config", EXIT_CONFIG_ERROR) if isinstance(e, ConfigError) else ("data", EXIT_DATA_ERROR)
        log0(f"{what} error: {e}")
        build.finish_logger(loggers, {}, exit_code=status)
        raise SystemExit(status) from None
    except Terminated as e:  # SIGTERM after training (callbacks/checkpoint.py): stop now, say what is on disk
        log0(f"terminated: SIGTERM during {e.phase}; stopping with exit status {e.code}. {kept_files(run_dir)}")
        build.finish_logger(loggers, {}, exit_code=e.code)
        raise
    except BaseException:
        build.finish_logger(loggers, {}, exit_code=1)  # one finished run per job, also when it fails
        raise
    if module.state.preempted:
        build.finish_logger(loggers, {"preempted": True})
        log0("exiting cleanly after preemption (no export)")
        return None
    results = challenge.export.results
    build.finish_logger(loggers, results)
    log_final_size(results)
    return results


def kept_files(run_dir: Path) -> str:
    """What a terminated run leaves: the artifacts it wrote (whole: written atomically) and whether
    results.json was written."""
    artifacts = sorted(Path(run_dir).glob("*.ptz"))
    written = (
        f"Written whole and kept: {', '.join(p.name for p in artifacts)}." if artifacts else "No artifact was written."
    )
    res = Path(run_dir) / "results.json"
    newest = max((p.stat().st_mtime for p in artifacts), default=0.0)
    results = "No results.json."
    if res.is_file():  # one older than the artifact is an earlier run's (in the packed file's folder)
        written_now = res.stat().st_mtime >= newest
        results = "results.json was written." if written_now else "The results.json is an earlier run's."
    return f"{written} {results}"


def log_final_size(results: dict) -> None:
    """The run's last lines, as the reference ends: the artifact's size, `Code size: N bytes` (the packed
    train_gpt.py) and the total against the limit."""
    export = results.get("export") if results else None
    if not export or not export.get("model_bytes"):
        return
    size = SizeReport(model_bytes=export["model_bytes"], code_bytes=export["code_bytes"], limit=export["limit_bytes"])
    for line in size.lines(export["label"].replace("_", "+")):
        log0(line)


def exit_status(cfg: DictConfig, results: dict | None) -> int:
    """0, or EXIT_OVER_LIMIT (with its error line) when the artifact is over the size limit and
    `export.fail_over_limit` is set."""
    if results and not results.get("size_ok", True) and cfg.export.fail_over_limit:
        log0("error: the artifact is over the size limit (export.fail_over_limit=true)")
        return EXIT_OVER_LIMIT
    return 0


def final_bpb(results: dict | None) -> float | None:
    """The standard round-trip val_bpb of `results` (None without it): what a sweep optimizes."""
    final = (results or {}).get("roundtrip", {}).get("standard")
    return final["val_bpb"] if final else None
