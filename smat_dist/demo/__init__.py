"""smat-demo: the whole job (data, SMAT and P>M>F meta-training, evaluation, figures, export, report) on an
embedded default, offline. cli.py is the command line; phases.py the phases it runs; sweep.py the --sweep grid;
report.py writes report.md; export.py the export-and-predict phase.

`main` is here because the console script names `smat_dist.demo:main`; it imports the command line only when
called, so importing a part of the demo does not import the rest.
"""


def main(argv: list[str] | None = None) -> int:
    from smat_dist.demo.cli import main as cli_main

    return cli_main(argv)
