"""Evaluate an artifact: `python eval.py artifact=PATH [eval=sliding] [eval=[standard,sliding,slot_1263]]` (Hydra).

Modes (conf/eval/): standard, sliding, ttt, lora_ttt, lora_ttt_1090, slot_1263, slot_1298, causal_slot.

Every key is validated first (pgolf/config/: `config error: ...`, exit status 2, before torch is imported).
Loads only the artifact (weights, model config and tokenizer identity inside it), validated before anything
is allocated (pgolf/export/weights.py), refuses a tokenizer whose hash or vocab size differs, runs the
selected modes on the validation split, and writes `eval_result.json` (score, the artifact's bytes with its
code, and a verdict: score-before-adapt, the 16,000,000-byte cap, the time budget, the artifact's own GPTQ
calibration record (`calibration_ok`; the record is copied and printed); and with `audit=true` the
per-target NLL/bytes in `audit.npz`). A bad artifact, tokenizer, data or setting is one line
`error: ...` on stderr, exit status 2; so is an `eval_result.json` (`audit.npz`) already in `out_dir`: it is
refused before the artifact is read, on every rank, unless `overwrite=true`, and so is an `out_dir` that cannot be
written; an allocation failure (out of memory) is one `error:` line too. `max_tokens=N` scores only the
first N validation targets: a quick look, not the challenge's metric (`compliant: false`). Under torchrun the
windows are split across processes and the sums reduced; the run has one output directory, rank 0's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from pgolf.config.schema import EvalRun
from pgolf.config.typed import ConfigError
from pgolf.config.validate import check_overrides, exit_on_config_error, validate_eval
from pgolf.runlog import global_rank
from pgolf.tools.rundir import leave, write_hydra_files

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    # conf/eval.yaml sets hydra.output_subdir to null: rank 0 writes `.hydra/` as Hydra would; torchrun's
    # other processes, which resolve the time in hydra.run.dir each on its own, leave theirs (one directory
    # per evaluation, not one per process).
    hc = HydraConfig.get()
    if global_rank() == 0:
        write_hydra_files(hc.runtime.output_dir, cfg, HydraConfig.instance().cfg, None)
    else:
        leave(hc.runtime.output_dir)
    with exit_on_config_error():  # `config error: ...`, exit status 2, before torch is imported
        validate_eval(cfg, CONF)
    # Deferred on purpose: the evaluation runtime brings torch and Lightning (several seconds); a missing
    # artifact or a bad key is reported without them.
    from pgolf.eval.run import evaluate_artifact, out_of_memory

    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(hc.runtime.output_dir)
    try:
        with exit_on_config_error():  # trainer=gpu on a machine without CUDA
            result = evaluate_artifact(
                artifact=cfg.artifact,
                modes=OmegaConf.to_container(cfg.eval, resolve=True),
                data=OmegaConf.to_container(cfg.data, resolve=True),
                accelerator=cfg.trainer.accelerator,
                batch_windows=cfg.batch_windows,
                seq_len=cfg.seq_len,
                budget_seconds=cfg.budget_seconds,
                audit=cfg.audit,
                compile=cfg.compile,
                max_tokens=cfg.max_tokens,
                out_dir=out_dir,
                overwrite=cfg.overwrite,
            )
    except (ValueError, OSError) as e:  # a bad artifact, tokenizer, data, setting, or an output there: one line, exit 2
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        raise SystemExit(2) from None
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):  # a bug: its traceback
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"error: out of memory ({first}): lower batch_windows= or seq_len=", file=sys.stderr)
        raise SystemExit(2) from None
    return result["val_bpb"]


def check_mode_overrides(args: list[str], conf_dir: Path = CONF) -> None:
    """`eval.<mode>.<key>=v` names a selected mode (`eval=...`, else conf/eval.yaml's `standard`) and one of its
    settings (conf/eval/<mode>.yaml), where Hydra prints a multi-line 'Could not override' error. `+` additions,
    deletions and sweeps are left to Hydra and the mode's own checks. Raises ConfigError."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except OverrideParseException:  # Hydra's own message
        return
    selected = ["standard"]
    for o in overrides:
        if o.key_or_group == "eval" and o.package is None:
            if o.is_sweep_override():
                return
            v = o.value()
            selected = [v] if isinstance(v, str) else [str(x) for x in v] if isinstance(v, list) else selected
    for o in overrides:
        parts = o.key_or_group.split(".")
        if parts[0] != "eval" or len(parts) < 3 or o.is_add() or o.is_delete() or o.package is not None:
            continue
        mode, key = parts[1], parts[2]
        if mode not in selected:
            raise ConfigError(
                f"{o.key_or_group}: mode {mode} is not selected (eval=[{','.join(selected)}]): "
                f"eval=[{','.join([*selected, mode])}] runs it"
            )
        f = conf_dir / "eval" / f"{mode}.yaml"
        settings = OmegaConf.load(f).get(mode) if f.is_file() else None
        if isinstance(settings, DictConfig) and key not in settings:
            add = f"; a per-mode {key} is added: +{o.key_or_group}=..." if key in ("seq_len", "batch_windows") else ""
            raise ConfigError(f"{o.key_or_group}: {mode} has no setting {key} (one of {', '.join(settings)}){add}")


if __name__ == "__main__":
    with exit_on_config_error():  # a misspelled key on the command line, named before Hydra composes
        check_overrides(sys.argv[1:], EvalRun, CONF)
        check_mode_overrides(sys.argv[1:])
    main()
