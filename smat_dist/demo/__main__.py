"""`python -m smat_dist.demo`: the same as smat-demo."""
from smat_dist.demo.cli import main

raise SystemExit(main())
