"""The `mmlens` command: the whole study from one config, the demo, hook listings and reports.

    mmlens demo [--out DIR]            every study on the embedded model and synthetic scenes
    mmlens study CONFIG.yaml [--out]   the same from a config (model, dataset, sites, probes, ...);
                                       under `torchrun --nproc-per-node N -m mmlens study ...` the
                                       probe sweeps are shared over N processes
    mmlens hooks MODEL                 every hook name with its shape for a one-image prompt
    mmlens report RUN_DIR              rebuild a run folder's HTML report
    mmlens compare RUN_A RUN_B         paired differences of two runs on the same images

Runs are resumable: rerunning the same command skips finished stages. Bad input (config,
folder, model name) ends with a one-paragraph message and exit status 2, not a traceback.
`--json` prints one JSON document on stdout (everything else goes to stderr) for scripts;
`--quiet` silences every progress bar, the libraries' included. The command imports torch only
once a command needs a model or results: `--help` and config errors answer in a fraction of a
second.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_DEMO_OUT = Path("runs/demo")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from .errors import MMLensError
    from .progress import quiet

    try:
        with quiet(getattr(args, "quiet", False)):
            if not getattr(args, "json", False):
                return args.handler(args)
            # every line a stage, a library or a warning prints goes to stderr: stdout is the document
            with contextlib.redirect_stdout(sys.stderr):
                document = args.handler(args)
            if isinstance(document, int):  # nothing to describe (e.g. no report yet): the status says so
                return document
            print(json.dumps(document, indent=2, allow_nan=False))
            return 0
    except (MMLensError, FileNotFoundError) as error:
        print(f"mmlens {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmlens", description="TransformerLens for multimodal LLMs: "
                                     "the segmentation drop-off / recovery study as one command.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mmlens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the whole study on the embedded model and synthetic scenes",
                               description="Run every study (probe sweep with controls, anchor knockout, position "
                                           "study) on tiny-shapes-llava and synthetic scenes, then write the report.")
    demo.add_argument("--out", type=Path, default=DEFAULT_DEMO_OUT, help=f"run folder (default {DEFAULT_DEMO_OUT})")
    _run_options(demo)
    demo.set_defaults(handler=_demo)

    study = commands.add_parser("study", help="run (or resume) a study described by a YAML config",
                                description="Run every enabled stage of the study in CONFIG into a run folder; "
                                            "rerunning resumes. See docs/cli.md and examples/configs/ for the schema.")
    study.add_argument("config", type=Path, help="study config (YAML)")
    study.add_argument("--out", type=Path, default=None, help="run folder (default: the config's `out`)")
    study.add_argument("--check", action="store_true", help="validate the config, print it with its hash, and stop")
    _run_options(study)
    study.set_defaults(handler=_study)

    hooks = commands.add_parser("hooks", help="list every hook point with its activation shape",
                                description="Run one forward pass on a blank image and print every hook name with "
                                            "the shape it carries, grouped by stage (vision, adapter, LLM).")
    hooks.add_argument("model", help="shipped name (tiny-shapes-llava), local folder or hub id")
    hooks.add_argument("--device", default="cpu")
    hooks.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    hooks.add_argument("--prompt", default="", help="text beside the image (default: empty)")
    _script_options(hooks, "{model, image_size, prompt, n_tokens, n_image_tokens, hooks: {stage: [{name, shape}]}}")
    hooks.set_defaults(handler=_hooks)

    report = commands.add_parser("report", help="rebuild the HTML report of a run folder",
                                 description="Rebuild RUN_DIR/report.html from the figures and tables saved in it.")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="report file (default RUN_DIR/report.html)")
    _script_options(report, "{report}", quiet=False)
    report.set_defaults(handler=_report)

    compare = commands.add_parser("compare", help="paired differences of two runs' drop and recovery",
                                  description="Compare two run folders made on the same images (e.g. a causal and a "
                                              "bidirectional twin): per seed, the difference in drop at the adapter and "
                                              "recovery in the LLM, with paired bootstrap intervals.")
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)
    compare.add_argument("--out", type=Path, default=None, help="also write the comparison as an HTML report here")
    _script_options(compare, "{runs, seeds: {SEED: {findings, table: [row, ...]}}, report}", quiet=False)
    compare.set_defaults(handler=_compare)
    return parser


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="delete every result already in the run folder and start over")
    parser.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                        help="compute STAGE (or one unit, e.g. probe_sweep/seed-1) again even if it finished, with the "
                             "stages that depend on it; repeatable. Also how a changed config replaces finished stages")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    _script_options(parser, "{run_folder, config_sha256, stages: [{unit, title, ran, seconds, summary}], findings, "
                            "report}; with --check: {config, config_sha256}")


def _script_options(parser: argparse.ArgumentParser, document: str, quiet: bool = True) -> None:
    if quiet:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bars or info logging, mmlens's nor transformers', datasets' or the hub's")
    parser.add_argument("--json", action="store_true",
                        help=f"print one JSON document on stdout, everything else on stderr: {document}")


def _demo(args: argparse.Namespace) -> int:
    from .runs import DEMO_CONFIG, load_config

    return _run(load_config(DEMO_CONFIG), args.out, args)


def _study(args: argparse.Namespace) -> int:
    from .errors import RunFolderError
    from .runs import load_config

    config = load_config(args.config)
    if args.check and args.json:
        return {"config": dataclasses.asdict(config), "config_sha256": config.sha256()}
    if args.check:
        print(config.to_yaml(), end="")
        print(f"# config sha256 {config.sha256()}")
        return 0
    out = args.out or (Path(config.out) if config.out else None)
    if out is None:
        raise RunFolderError("no run folder: pass --out DIR or set `out:` in the config")
    return _run(config, out, args)


def _run(config, out: Path, args: argparse.Namespace) -> int | dict[str, Any]:
    from . import distributed
    from .errors import ConfigError
    from .placement import collective_gpu
    from .runs import run_study
    from .runs.config_checks import device_problems

    problems = device_problems(config)  # before joining: a rank that cannot place its model says why
    if problems:
        raise ConfigError(problems, "the config, on this machine")
    # started by torchrun (WORLD_SIZE > 1): join its process group, on the GPU this rank's model
    # uses (NCCL) or the CPU (gloo); rank 0 writes the run folder
    distributed.init_from_environment(collective_gpu(config.device, config.device_map), config.collective_timeout_s)
    try:
        run = run_study(config, out, overwrite=args.overwrite, rerun=tuple(args.rerun), progress=not args.quiet,
                        report=not args.no_report, echo=_echo(args))
    finally:
        distributed.shutdown()
    if args.json:
        return _run_document(run, out)
    if run.report_path is not None:
        print(f"\nopen {run.report_path} in a browser; results (parquet tables, probes, figures) are in {out}/")
    return 0


def _echo(args: argparse.Namespace):
    """Where the run's own lines go: stdout, or stderr when stdout carries the JSON document."""
    return (lambda text: print(text, file=sys.stderr)) if args.json else print


def _run_document(run, out: Path) -> dict[str, Any]:
    from .runs import load_run

    if run.folder is None:  # a torchrun rank other than 0: rank 0 writes and reports the run
        return {"run_folder": str(out), "rank_writes": False}
    results = load_run(out)
    return {
        "run_folder": str(Path(out).resolve()),
        "config_sha256": results.config_sha256,
        "stages": [{"unit": u.unit, "title": u.title, "ran": u.ran, "seconds": round(u.seconds, 3),
                    "status": results.stages.get(u.unit), "summary": u.summary} for u in run.units],
        "findings": results.findings,
        "report": None if run.report_path is None else str(Path(run.report_path).resolve()),
        "report_problem": run.report_problem,
    }


def _hooks(args: argparse.Namespace) -> int | dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from .model import HookedMLLM

    model = HookedMLLM.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    model.set_use_attn_result(True)  # so the per-head outputs show up too
    size = model.cfg.vision.image_size
    blank = Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8))
    inputs = model.prepare([blank], args.prompt)
    with torch.no_grad():  # not set_grad_enabled: `main` may run inside a caller's process
        _, cache = model.run_with_cache(inputs)
    if args.json:
        return {"model": args.model, "image_size": size, "prompt": args.prompt, "n_tokens": inputs.input_ids.shape[1],
                "n_image_tokens": inputs.layout.positions(0).numel(),
                "hooks": {stage: [{"name": n, "shape": list(cache[n].shape) if n in cache else None}
                                  for n in model.hook_names(stage)] for stage in ("vision", "adapter", "llm")}}
    print(f"{args.model}: one {size}x{size} image, prompt {args.prompt!r}, {inputs.input_ids.shape[1]} tokens "
          f"({inputs.layout.positions(0).numel()} image tokens)")
    for stage in ("vision", "adapter", "llm"):
        names = [n for n in model.hook_names(stage) if n in cache]
        silent = [n for n in model.hook_names(stage) if n not in cache]
        print(f"\n[{stage}] {len(names)} hooks")
        width = max((len(n) for n in names), default=0)
        for name in names:
            print(f"  {name:<{width}}  {list(cache[name].shape)}")
        for name in silent:
            print(f"  {name:<{width}}  (does not fire on this input)")
    return 0


def _report(args: argparse.Namespace) -> int | dict[str, Any]:
    from .runs import RunFolder, build_report

    folder = RunFolder.open(args.run_dir)
    path, problem = build_report(folder, args.out)
    if path is None:
        print(f"mmlens report: no report for {args.run_dir}: {problem}", file=sys.stderr)
        return 1
    if args.json:
        return {"report": str(Path(path).resolve())}
    print(f"report written to {path}")
    return 0


def _compare(args: argparse.Namespace) -> int | dict[str, Any]:
    import pandas as pd

    from .probing.compare import comparison_findings
    from .runs.compare import compare_runs, write_comparison

    tables = compare_runs(args.run_a, args.run_b)
    written = None if args.out is None else write_comparison(tables, args.out)
    if args.json:
        # to_json writes NaN (a withheld ratio) as null, which json.loads reads back as None
        return {"runs": [str(args.run_a), str(args.run_b)], "report": None if written is None else str(written),
                "seeds": {str(seed): {"findings": comparison_findings(table),
                                      "table": json.loads(table.reset_index().to_json(orient="records"))}
                          for seed, table in tables.items()}}
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
        for seed, table in tables.items():
            print(f"seed {seed}:")
            print("\n".join(f"  {line}" for line in comparison_findings(table)))
            print(table.to_string())
    if written is not None:
        print(f"comparison written to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
