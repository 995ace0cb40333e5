"""Stage 3: segmentation net (--method: PSL, STC or any registered in wsss.methods) on stage 2's pseudo-masks -> outputs/RUN/stage3/ (see wsss/segment.py)."""
from wsss import segment
from wsss.run import common_parser
from wsss.stage import main as run_stage


def main(argv=None):
    parser = common_parser(__doc__, "stage3")
    segment.add_args(parser)
    return run_stage(segment.run, parser, argv)


if __name__ == "__main__":
    main()
