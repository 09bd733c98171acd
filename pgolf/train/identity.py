"""Who a run is: experiment, variant and seed (the W&B group and the compare group).

Identity. A run belongs to the group `experiment` (the config's `name`) or, when it is one variant of an
ablation, `experiment[key=value,...]`. The variant is the config's `variant` when set; otherwise, for a
job of a Hydra multirun, the job's values of the keys the sweep varies other than `seed` and
`experiment` (read from the sweep's `multirun.yaml`). `python train.py -m experiment=demo seed=1,2,3
model.smear_gate=record,none` therefore gives the groups `demo[model.smear_gate=record]` and
`demo[model.smear_gate=none]`, three seeds each. The W&B logger and `pgolf.tools.compare` derive it the same
way, from the same files, so a W&B group and a compare group are the same runs.

"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

# Keys that never name a variant: the seed is the replicate, `experiment` is already the group's name.
NON_VARIANT_KEYS = ("seed", "experiment")


@dataclass(frozen=True)
class RunIdentity:
    experiment: str
    seed: int
    variant: str = ""
    variant_items: tuple[tuple[str, str], ...] = field(default=())

    @property
    def group(self) -> str:
        return f"{self.experiment}[{self.variant}]" if self.variant else self.experiment

    @property
    def job_name(self) -> str:
        return f"{self.group}-seed{self.seed}"

    def tags(self) -> list[str]:
        return [f"exp:{self.experiment}", f"seed:{self.seed}", *(f"{k}={v}" for k, v in self.variant_items)]


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(o) for o in overrides])


def swept_keys(sweep_overrides: list[str]) -> list[str]:
    """Keys a multirun varies (`k=a,b`, `k=range(..)`, `k=choice(..)`), in command-line order."""
    return [o.key_or_group for o in _parse(sweep_overrides) if o.is_sweep_override()]


def variant_items(job_overrides: list[str], sweep_overrides: list[str]) -> tuple[tuple[str, str], ...]:
    """(key, value) of this job for every swept key other than seed/experiment."""
    keys = [k for k in swept_keys(sweep_overrides) if k not in NON_VARIANT_KEYS]
    values = {}
    for o in _parse(job_overrides):
        if not o.is_sweep_override() and not o.is_delete():  # the value as typed (`false`, not `False`)
            values[o.key_or_group] = o.input_line.split("=", 1)[1] if o.input_line else o.get_value_element_as_str()
    return tuple((k, values[k]) for k in keys if k in values)


def find_sweep_file(run_dir: str | Path, max_up: int = 3) -> Path | None:
    """The `multirun.yaml` of the sweep a job directory belongs to (the sweep dir or a parent of it)."""
    p = Path(run_dir).resolve()
    for _ in range(max_up):
        p = p.parent
        f = p / "multirun.yaml"
        if f.is_file():
            return f
    return None


def sweep_overrides_of(run_dir: str | Path) -> list[str]:
    f = find_sweep_file(run_dir)
    if f is None:
        return []
    doc = yaml.safe_load(f.read_text()) or {}
    return list(((doc.get("hydra") or {}).get("overrides") or {}).get("task") or [])


def identity(
    experiment: str, seed: int, variant: str | None, job_overrides: list[str], sweep_overrides: list[str]
) -> RunIdentity:
    if variant:
        return RunIdentity(str(experiment), int(seed), str(variant), ())
    items = variant_items(job_overrides, sweep_overrides)
    return RunIdentity(str(experiment), int(seed), ",".join(f"{k}={v}" for k, v in items), items)


def identity_of_dir(run_dir: str | Path) -> RunIdentity:
    """The identity of a finished (or running) job directory, from the files Hydra wrote there."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    ov_file = run_dir / ".hydra" / "overrides.yaml"
    job_overrides = (yaml.safe_load(ov_file.read_text()) or []) if ov_file.is_file() else []
    sweep = sweep_overrides_of(run_dir)
    return identity(cfg.get("name", "?"), cfg.get("seed", 0), cfg.get("variant"), job_overrides, sweep)


def identity_of_job(cfg, run_dir: str | Path) -> RunIdentity:
    """The identity of the running job (its Hydra overrides and the sweep's `multirun.yaml`)."""
    from hydra.core.hydra_config import HydraConfig

    job_overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return identity(cfg.name, cfg.seed, cfg.get("variant"), job_overrides, sweep_overrides_of(run_dir))
