"""Stage 2: mined regions + saliency -> fused pseudo-masks -> dense CRF -> outputs/RUN/stage2/ (see wsss/pseudo.py)."""
from wsss import pseudo
from wsss.run import common_parser
from wsss.stage import main as run_stage


def build_parser():
    return pseudo.add_args(common_parser(__doc__, "stage2"))


def main(argv=None):
    return run_stage(pseudo.run, build_parser(), argv)


if __name__ == "__main__":
    main()
