"""Stage 1: CAM classifier and adversarial erasing -> outputs/RUN/stage1/ (see wsss/erasing.py)."""
from wsss import erasing
from wsss.run import common_parser


def main(argv=None):
    parser = erasing.add_args(common_parser(__doc__))
    erasing.run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
