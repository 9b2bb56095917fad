"""``python -m engine.sweep DIR`` (or ``engine sweep DIR``): rebuild a multirun dir's summary now.

Works for a finished sweep, one still running (another process is writing job dirs; its own
callback will overwrite the files after its next job) and one that was killed. ``--compare
RUN ...`` builds the same table for any run dirs (different recipes, single runs, jobs of
different sweeps): printed, and written to ``--out`` when given.

    python -m engine.sweep outputs/lora_smollm2/multirun_2026-11-22_10-00-00
    python -m engine.sweep outputs/.../multirun_... --metric evaluate.test.token_f1
    python -m engine.sweep --compare outputs/a/2026-... outputs/b/2026-... --out outputs/compare_ab
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import UserError
from engine.sweep.spec import KEY


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.sweep",
        description="Rebuild a sweep's summary (sweep_summary.csv/.md/.html/.json/.png), or compare run dirs.",
    )
    p.add_argument("dir", nargs="?", help="a multirun dir (hydra.sweep.dir): its summary is rebuilt in place")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="run dirs to put in one table instead")
    p.add_argument("--out", help="with --compare: write the summary files into this folder")
    p.add_argument("--metric", help="the metrics.json key to plot (default: sweep.metric, the objective, train.final_loss)")
    p.add_argument("--objective", help="the key the best job is chosen by (default: the sweep's sweep.objective)")
    p.add_argument("--direction", choices=["minimize", "maximize"], help="whether a smaller or larger objective is better")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from engine.sweep.summary import collect_runs, collect_sweep, to_markdown, write

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        for name in ("metric", "objective"):
            value = getattr(args, name)
            if value is not None and not KEY.match(value):
                raise UserError(f"--{name}: '{value}' is not a metrics.json key; write it dotted, e.g. train.final_loss")
        settings = {"metric": args.metric, "objective": args.objective, "direction": args.direction}
        if args.compare:
            if args.dir:
                raise UserError(f"give either a sweep dir or --compare RUN ..., not both ('{args.dir}' and --compare)")
            runs = [Path(r) for r in args.compare]
            missing = [str(r) for r in runs if not r.is_dir()]
            if missing:
                raise UserError(f"--compare: not a directory: {', '.join(missing)}; give run dirs (outputs/<recipe>/<time>)")
            summary = collect_runs(runs, **settings)
            print(to_markdown(summary))
            if args.out:
                paths = write(summary, Path(args.out))
                print(f"written: {', '.join(str(p) for p in paths)}")
            return 0
        if not args.dir:
            raise UserError("give a multirun dir (python -m engine.sweep outputs/<recipe>/multirun_<time>) or --compare RUN ...")
        sweep_dir = Path(args.dir)
        if not sweep_dir.is_dir():
            raise UserError(f"{sweep_dir} is not a directory; give a multirun dir (hydra.sweep.dir of the sweep)")
        summary = collect_sweep(sweep_dir, **settings)
        if not summary.rows:
            raise UserError(
                f"{sweep_dir} holds no sweep job (no <job>/.hydra/overrides.yaml or sweep_job.json); "
                "for plain run dirs use --compare RUN ..."
            )
        paths = write(summary, sweep_dir)
        print(to_markdown(summary))
        print(f"written: {', '.join(str(p) for p in paths)}")
        return 0
    except UserError as e:
        sys.stderr.write(f"engine: {e}\n")
        return 2


def after_multirun() -> int:
    """The exit status of ``python -m engine -m ...``, called by the entry point after Hydra returns.

    1 when any job failed (each is in the summary with its error); when the sweep ended early (a
    stop, a launcher error) the callback never saw its end, so the summary is rebuilt here.
    """
    from engine.sweep.callback import LAST

    if "dir" not in LAST:
        return 0
    if "jobs" not in LAST:
        try:
            from engine.sweep.summary import rebuild

            rebuild(LAST["dir"])
            print(f"[engine] the sweep ended early; summary of what ran: {LAST['dir'] / 'sweep_summary.md'}", file=sys.stderr)
        except Exception as e:  # never hide the error that ended the sweep behind one of ours
            print(f"[engine] could not write the sweep summary: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if LAST.get("failed"):
        failed = LAST["failed"]
        sys.stderr.write(
            f"engine: {len(failed)} of {LAST['jobs']} sweep jobs failed (job {', '.join(failed)}); "
            f"their errors are in {LAST['dir'] / 'sweep_summary.md'}\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
