"""Stage 1: CAM classifier and adversarial erasing -> outputs/RUN/stage1/ (see wsss/erasing.py)."""
from wsss import erasing
from wsss.run import common_parser
from wsss.stage import main as run_stage


def main(argv=None):
    return run_stage(erasing.run, erasing.add_args(common_parser(__doc__, "stage1")), argv)


if __name__ == "__main__":
    main()
