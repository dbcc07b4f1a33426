"""Metric logging of a run (run_dir/metrics.jsonl, optionally TensorBoard) and its curves (curves.png)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mm_moe.errors import ConfigError, InputError

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON record per logged step to run_dir/metrics.jsonl (and TensorBoard when asked).

    Only the main process writes (`enabled`). After a resume, `truncate_after(step)` drops the records of the
    steps that the resumed run is about to repeat, so every step appears once.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                                  "pip install 'mm_moe[tensorboard]'") from err
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        """Write one record; it must hold "step"."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (written before a kill, about to be recomputed), and a torn last
        line (a crash or a full disk during the append), with a warning."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line, record in _records(self.path) if record["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every line of a metrics.jsonl; a last line that does not parse (torn by a crash or a full
    disk) is left out with a warning, any other one is an error naming the line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if n < len(lines):
                raise InputError(f"{path}:{n}: not a JSON record ({err})") from err
            log.warning("%s: its last line is torn (%s) and is dropped: %r", path, err.msg, line[:80])
    return out


def read_metrics(run_dir: str | Path) -> dict[int, dict]:
    """The records of a run's metrics.jsonl by step, the records of one step (training, validation) merged."""
    path = Path(run_dir) / "metrics.jsonl"
    out: dict[int, dict] = {}
    for _, record in _records(path) if path.is_file() else []:
        out[record["step"]] = {**out.get(record["step"], {}), **record}
    return out


def plot_curves(run_dir: str | Path, validation: tuple[str, ...] = ()) -> Path | None:
    """run_dir/curves.png: loss, aux loss and expert load imbalance over steps, and the `validation` scores
    (None without metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        return None
    panels = [("loss", "loss (task + aux)"), ("aux_loss", "MoE aux loss"),
              ("load_imbalance", "load imbalance (max / mean load)"), *((k, f"validation: {k}") for k in validation)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        steps = [s for s in sorted(records) if key in records[s]]
        ax.plot(steps, [records[s][key] for s in steps], marker="o" if key in validation else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["MetricsLogger", "read_metrics", "plot_curves"]
