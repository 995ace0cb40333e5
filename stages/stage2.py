"""Stage 2: mined regions + saliency -> fused pseudo-masks -> dense CRF -> outputs/RUN/stage2/ (see wsss/pseudo.py).
The same as `wsss stage2` once the package is installed."""
from wsss.cli import stage2 as main
from wsss.cli import stage2_parser as build_parser  # noqa: F401 - used by tests and the report

if __name__ == "__main__":
    main()
