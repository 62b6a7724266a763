"""`onsft demo`: the whole story on the embedded model organism, on a CPU, in minutes.

    onsft demo --out runs/demo

1. data    the organism's synthetic sets: a new skill ("Cycle X.") taught by teacher data in five
           styles, from the organism's own to far off-policy; in-domain, OOD and retention tests.
2. audit   DDT: how off-policy is the teacher data for the organism, style by style (mean phi, Z,
           p-values), with the organism's own samples as the on-policy baseline (report.html).
3. rewrite hinted decoding turns the teacher data into the organism's own distribution; verified.
4. train   SFT, DFT, IDFT on the teacher data and IDFT on the rewrites, from the same start.
5. eval    skill gained (in-domain, OOD), skill kept (retention accuracy, KL drift), table + plots.

Steps 2-5 are `onsft compare` with the settings below (an experiment with an `audit:` section); every
step is cached and resumable, so a rerun of the same command only redoes what is missing. Results go to
OUT/demo.md with the plots.

From Python: `run(DemoConfig(out="runs/demo"))`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onsft.engine.trainer import TrainConfig
from onsft.errors import UserError
from onsft.organism.tasks import write_demo_data
from onsft.pipeline.compare import stage as compare
from onsft.pipeline.compare.comparison import table_markdown
from onsft.pipeline.compare.experiment import Experiment
from onsft.pipeline.data.stage import OrganismDataConfig
from onsft.runtime.models import ModelArguments, resolve_model_path
from onsft.runtime.records import check_writable, write_json_atomic, write_text_atomic
from onsft.runtime.settings import field_like

DEMO_METHODS = ["sft", "dft", "idft", "rewrite+idft"]


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "Output folder."})
    seed: int = field(default=0, metadata={"help": "Seed of the data, the rewrite and the training."})
    methods: list[str] = field_like(Experiment, "methods", default_factory=lambda: list(DEMO_METHODS))
    steps: int = field(default=300, metadata={"help": "Training steps per method."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate (the organism study's 2e-4)."})
    batch_size: int = field_like(TrainConfig, "per_device_train_batch_size", default=32)
    n_train: int = field_like(OrganismDataConfig, "n_train", default=100)
    n_test: int = field(default=200, metadata={"help": "Rows of each test set."})
    curve_every: int = field_like(Experiment, "curve_every", default=100)
    curve_limit: int = field_like(Experiment, "curve_limit", default=50)
    bf16: bool = field_like(
        TrainConfig,
        "bf16",
        "bf16 mixed precision for every run of the demo, on by default (about 2x faster on a CPU for the organism; "
        "the README's table was made with it).",
        default=True,
    )


def _experiment(config: DemoConfig, data: dict[str, Path], model: ModelArguments) -> Experiment:
    return Experiment(
        model=model,
        train_data=str(data["new_skill_train"]),
        in_domain=str(data["new_skill_test"]),
        ood=str(data["new_skill_ood"]),
        retention=str(data["retention_test"]),
        methods=config.methods,
        seeds=[config.seed],
        out=str(Path(config.out) / "compare"),
        kl_limit=64,
        curve_every=config.curve_every,
        curve_limit=config.curve_limit,
        train={
            "max_steps": config.steps,
            "per_device_train_batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 20,
            "max_length": 128,
            "bf16": config.bf16,
            "logging_steps": 10,
        },
        rewrite={
            "verifier": "exact",
            "own_samples": 4,
            "beta": 3.0,
            "max_new_tokens": 48,
            "seed": config.seed,
            "chunk_size": 100,
            "own_batch_size": 100,
            "batch_size": 100,
        },
        pairs={"verifier": "exact", "samples": 4, "max_new_tokens": 48, "seed": config.seed},
        eval={"verifier": "exact", "max_new_tokens": 48, "batch_size": 100},
        # DDT of the teacher data, per style, with the organism's own samples as the on-policy baseline.
        audit={
            "self_check": 100,
            "self_check_max_new_tokens": 48,
            "seed": config.seed,
            "max_length": 128,
            "group_by": "style",
        },
    )


def _markdown(config: DemoConfig, audit_summary: dict, results: dict, rewrite: dict | None, seconds: float) -> str:
    lines = [
        "# onsft demo on the embedded organism",
        "",
        f"Command: `onsft demo --out {config.out}` (seed {config.seed}, {config.steps} steps per method, "
        f"batch {config.batch_size}, lr {config.learning_rate}); wall time {seconds / 60:.1f} min.",
        "",
        "## 1. How off-policy is the teacher data? (DDT audit)",
        "",
        "| teacher style | mean phi per response |",
        "|---|---|",
    ]
    sets = audit_summary.get("sets", {})
    by_style = sets.get("scores", {}).get("by_group", {})
    for style, summary in sorted(by_style.items(), key=lambda kv: -kv[1]["mean_phi_response_weighted"]):
        lines.append(f"| {style} | {summary['mean_phi_response_weighted']:.2f} |")
    if "scores" in sets:
        data = sets["scores"]
        lines += [
            "",
            f"All teacher data: mean phi {data['mean_phi_response_weighted']:.2f}, "
            f"{100 * data['fraction_ood']:.0f}% of responses below the -0.1 threshold, "
            f"{100 * data['fraction_rejected']:.0f}% rejected as on-policy at p < 0.05.",
        ]
    if "self_check" in sets:
        own = sets["self_check"]
        lines += [
            f"The organism's own samples (the on-policy baseline): mean phi "
            f"{own['mean_phi_response_weighted']:.3f} ± {own['mean_phi_se']:.3f}, Z mean {own['z_mean']:.2f}, "
            f"Z std {own['z_std']:.2f} (calibrated: 0 and 1)."
        ]
    if rewrite:
        phi = rewrite["mean_phi"]

        def show(key):
            return f"{phi[key]['mean_phi']:.2f} (n={phi[key]['n']})" if phi.get(key, {}).get("n") else "-"

        lines += [
            "",
            "## 2. Hinted-decoding rewrite",
            "",
            f"Of {rewrite['rows']} teacher rows: {rewrite['own_correct']} kept as the organism's own verified "
            f"answer, {rewrite['rewritten']} rewritten by hinted decoding and verified, {rewrite['dropped']} "
            f"dropped.",
            "",
            "| responses | mean phi |",
            "|---|---|",
            f"| teacher references (all) | {show('references')} |",
            f"| references that were rewritten | {show('references_of_rewritten')} |",
            f"| hinted rewrites | {show('rewritten')} |",
            f"| own answers kept | {show('own')} |",
        ]
    lines += [
        "",
        "## 3. Skill gained vs skill kept",
        "",
        table_markdown(results["rows"]),
        "",
        "![skill vs retention](compare/skill_vs_retention.png)",
        "",
    ]
    if "curves.png" in results.get("plots", []):
        lines += ["![curves](compare/curves.png)", ""]
    lines += [
        "![training](compare/training.png)",
        "",
        "Audit report: [compare/audit/report.html](compare/audit/report.html)",
        "",
    ]
    return "\n".join(lines)


def run(config: DemoConfig, model: ModelArguments | None = None) -> dict:
    """The demo: the organism's data, then `onsft compare` with an audit; writes OUT/demo.md. `model` sets the
    device and dtype (the model itself is the embedded organism: its tasks are what the demo teaches)."""
    model = model or ModelArguments()
    if config.steps <= 0 or config.n_train <= 0 or config.n_test <= 0:
        raise UserError("steps, n_train and n_test must be positive", where="command line", fix="pass positive values.")
    if model.model != "organism":
        raise UserError(
            f"the demo runs on the embedded organism, not `{model.model}`",
            where="--model",
            fix="drop --model, or run `onsft compare --config EXPERIMENT.yaml` with your model.",
        )
    started = time.time()
    out = Path(config.out)
    check_writable(out / "demo.md")
    resolve_model_path("organism")
    data = write_demo_data(
        out / "data",
        seed=config.seed,
        n_train=config.n_train,
        n_test=config.n_test,
        n_ood=config.n_test,
        n_retention=config.n_test,
    )
    print("onsft demo: auditing (DDT), rewriting, training and evaluating (onsft compare)", file=sys.stderr, flush=True)
    results = compare.run(_experiment(config, data, model))
    rewrite_summary_path = out / "compare" / "data" / "rewrite" / "summary.json"
    rewrite = json.loads(rewrite_summary_path.read_text()) if rewrite_summary_path.exists() else None
    seconds = time.time() - started
    audit_summary = results.get("audit") or {}
    write_text_atomic(out / "demo.md", _markdown(config, audit_summary, results, rewrite, seconds))
    write_json_atomic(
        out / "demo.json",
        {
            "config": asdict(config),
            "audit": audit_summary,
            "rewrite": rewrite,
            "rows": results["rows"],
            "seconds": seconds,
        },
    )
    print(f"onsft demo: done in {seconds / 60:.1f} min; see {out / 'demo.md'}", file=sys.stderr, flush=True)
    return results


# The settings `run` takes, in its order: the command line fills one of each.
CONFIGS = (DemoConfig, ModelArguments)
