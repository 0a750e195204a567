"""conflayers-sweep: the command line of sweep.py."""
from __future__ import annotations

import json
import sys

import click


@click.command(name="conflayers-sweep", context_settings={"help_option_names": ["-h", "--help"],
                                                          "max_content_width": 100})
@click.option("--model", "models", multiple=True, default=("smollm2-135m-instruct",), show_default=True,
              help="A model, as conflayers-compile --model takes it (repeatable).")
@click.option("--calib", "calibs", multiple=True, default=("gsm8k",), show_default=True,
              help="A calibration task, as conflayers-compile --calib takes it (repeatable); each makes "
                   "the profile conflayers-compile would name.")
@click.option("--target", "targets", multiple=True, type=click.Choice(["native", "fp32", "int8", "int4"]),
              help="Target precision (repeatable; one bundle per target) [default: the compiler's].")
@click.option("--out-dir", default="bundles", show_default=True, type=click.Path(file_okay=False),
              help="Bundles go to OUT_DIR/<model name> (OUT_DIR/<model name>-<target> with several targets).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run each cell as a Ray task reserving a whole node's CPUs: on the cluster at ADDRESS "
                   "(auto, host:6379, ray://host:10001), or on a local Ray instance when no address is "
                   "given. Without --ray the cells run here, one after another.")
@click.option("--cpus-per-cell", type=click.IntRange(min=1), default=None,
              help="CPUs a cell reserves with --ray [default: the largest CPU count of the nodes it may run on].")
@click.option("--resource", default=None, metavar="NAME",
              help="With --ray: run cells only on nodes with this custom Ray resource (the node type the "
                   "profiles are for; ray start --resources='{\"NAME\": 1}'), one cell per unit.")
@click.option("--redo", is_flag=True, help="Compile every cell, even those whose profile is up to date.")
@click.option("--force", is_flag=True, help="Replace a bundle directory that is not a bundle of the cell's model.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome of every cell as JSON on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.argument("compile_args", nargs=-1, type=click.UNPROCESSED)
def main(models, calibs, targets, out_dir, ray_address, cpus_per_cell, resource, redo, force, as_json,
         no_progress, compile_args):
    """Compile every (model, task, target) cell and add each profile to its model's bundle.

    Options after `--` go to every conflayers-compile run, e.g.
    `conflayers-sweep --calib gsm8k --calib humaneval --ray -- --time-budget 300`.

    A failed cell is reported with its error and the others still land. A rerun skips the cells
    whose bundle already holds their profile compiled from the same inputs. Exit status 1 when a
    cell failed.
    """
    try:
        from . import sweep as sw
    except ImportError as e:
        raise click.ClickException(f"the compiler needs its extra dependencies ({e.name} is missing): "
                                   "pip install 'conflayers[compiler]'") from None
    from conflayers.runtime.rayutil import RayMissing, connect

    args = list(compile_args)
    try:
        sw.check_compile_args(args)
        cells = sw.plan(list(models), list(calibs), list(targets), out_dir, args)
        if ray_address is None:
            executor = sw.run_local
        else:
            ray = connect(ray_address, log_to_driver=False)
            cpus = cpus_per_cell or sw.node_cpus(ray, resource)
            click.echo(f"conflayers-sweep: {len(cells)} cells on Ray ({ray_address or 'local instance'}), "
                       f"{cpus} CPUs each" + (f", on nodes with {resource}" if resource else ""), err=True)

            def executor(jobs):
                return sw.run_ray(jobs, ray, cpus, resource)
        outcomes = sw.sweep(cells, args, executor, redo=redo, force=force, progress=not no_progress)
    except (sw.SweepError, RayMissing, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; the profiles published so far are in place") from None
    report = sw.summary(outcomes)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    click.echo(f"conflayers-sweep: {report['ok']} compiled, {report['skipped']} up to date, "
               f"{report['failed']} failed", err=True)
    for o in outcomes:
        if o.status == "failed":
            click.echo(f"  FAILED {o.cell.label}: {o.error}", err=True)
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
