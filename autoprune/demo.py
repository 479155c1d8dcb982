"""The offline demo: the whole pipeline on synthetic data, minutes on 2 CPU cores.

Dense training, sensitivity scan and priors, a short study, the Pareto front
printed and the report written (``reports/demo/report.html``).
The config is ``studies/demo.toml`` (kept here too so that the demo runs from
an installed package; a test checks the two are the same).
"""

from __future__ import annotations

from pathlib import Path

from .config import (ConstraintsSection, DataSection, FinetuneSection, ModelSection, PriorsSection,
                     StudyConfig, StudySection)
from .report import write_report
from .search import format_summary, run_search


def demo_config(out_dir: Path | str = "reports/demo") -> StudyConfig:
    return StudyConfig(
        study=StudySection(name="demo", kind="fine_grained", trials=8, sampler="tpe", seed=0),
        model=ModelSection(width=0.125, train_epochs=4),
        data=DataSection(spec="synthetic:2560"),
        constraints=ConstraintsSection(max_size_fraction=0.25, max_accuracy_drop=3.0),
        finetune=FinetuneSection(epochs=2, batch_size=128, lr=0.01),
        priors=PriorsSection(grid=[0.5, 0.7, 0.9], tolerance=10.0),
    ).validate()


def run_demo(out_dir: Path = Path("reports/demo"), quiet: bool = False) -> dict:
    config = demo_config()
    config.study.out_dir = str(out_dir)
    summary = run_search(config, progress=not quiet)
    files = write_report(config.storage_url, config.study.name, out_dir)
    summary["report"] = files.get("report.html")
    summary["summary"] = format_summary(summary) + f"\nreport: {summary['report']}"
    return summary
