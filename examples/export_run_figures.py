"""Write every figure of a finished run folder as a standalone page that opens offline.

Run: `python examples/export_run_figures.py RUN_DIR OUT_DIR [--prefix demo_]`. Each figure the
run saved (plotly JSON under `stages/*/seed-*/figures/`) becomes `OUT_DIR/PREFIX{name}.html`
(with `_seed{k}` when the run has several seeds), and all of them share one `plotly.min.js`
written in OUT_DIR. This is how `docs/figures/demo_*.html` are made from `mmlens demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmlens.runs import RunFolder
from mmlens.viz import save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (mmlens demo / mmlens study)")
    parser.add_argument("out_dir", type=Path, help="folder for the pages and their shared plotly.min.js")
    parser.add_argument("--prefix", default="", help="prepended to every file name")
    args = parser.parse_args()
    folder = RunFolder.open(args.run_dir)
    units = folder.done_units()
    seeds = {folder.record(unit).get("seed") for unit in units}
    written = []
    for unit in units:
        record = folder.record(unit)
        suffix = f"_seed{record.get('seed')}" if len(seeds) > 1 else ""
        for name in record["figures"]:
            written.append(save_figure(folder.figure(unit, name), args.out_dir / f"{args.prefix}{name}{suffix}.html"))
    print(f"{len(written)} figures written to {args.out_dir}/ (they share {args.out_dir / 'plotly.min.js'})")


if __name__ == "__main__":
    main()
