"""The `wsss` command: `wsss stage1|stage2|stage3|eval|predict|... [flags]`, one entry point for an
installed package (`pip install .`), where the repository's `stages/*.py` and `python -m` lines are
not at hand. Each command is the module's own `main`, so `wsss stage1 --help` and
`python stages/stage1.py --help` are the same parser; the stage scripts are thin wrappers of the
`stage1`/`stage2`/`stage3` functions here.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, what it does); each module has main(argv) -> exit status
COMMANDS = {
    "stage1": ("wsss.cli", "CAM classifier and adversarial erasing -> outputs/RUN/stage1/"),
    "stage2": ("wsss.cli", "mined regions + saliency -> pseudo-masks (dense CRF) -> outputs/RUN/stage2/"),
    "stage3": ("wsss.cli", "segmentation net on the pseudo-masks -> outputs/RUN/stage3/"),
    "eval": ("wsss.eval", "score predictions, pseudo-masks or seeds against ground truth"),
    "predict": ("wsss.predict", "predict a split or any folder of photos with a trained net or a model file"),
    "modelfile": ("wsss.modelfile", "write a run's net as one self-contained model file"),
    "export": ("wsss.export", "export a net to TorchScript or ONNX, checked against it"),
    "report": ("wsss.report", "one static HTML page of a run"),
    "import": ("wsss.data.importer", "a folder of photos and their tags -> a dataset in the VOC layout"),
    "voc": ("wsss.data.voc", "prepare, check or subset PASCAL VOC 2012 + SBD"),
    "synthetic": ("wsss.data.synthetic", "generate the embedded demo dataset"),
}


def stage1(argv=None):
    """Stage 1: CAM classifier and adversarial erasing -> outputs/RUN/stage1/ (see wsss/erasing.py)."""
    from wsss import erasing
    from wsss.run import common_parser
    from wsss.stage import main as run_stage

    return run_stage(erasing.run, erasing.add_args(common_parser(stage1.__doc__, "stage1")), argv)


def stage2_parser():
    from wsss import pseudo
    from wsss.run import common_parser

    return pseudo.add_args(common_parser(stage2.__doc__, "stage2"))


def stage2(argv=None):
    """Stage 2: mined regions + saliency -> fused pseudo-masks -> dense CRF -> outputs/RUN/stage2/
    (see wsss/pseudo.py)."""
    from wsss import pseudo
    from wsss.stage import main as run_stage

    return run_stage(pseudo.run, stage2_parser(), argv)


def stage3(argv=None):
    """Stage 3: segmentation net (--method: PSL, STC or any registered in wsss.methods) on stage 2's pseudo-masks
    -> outputs/RUN/stage3/ (see wsss/segment.py)."""
    from wsss import segment
    from wsss.run import common_parser
    from wsss.stage import main as run_stage

    parser = common_parser(stage3.__doc__, "stage3")
    segment.add_args(parser)
    return run_stage(segment.run, parser, argv)


def usage() -> str:
    lines = ["usage: wsss COMMAND [flags]   (wsss COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:10s} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from wsss import __version__

        print(f"wsss {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"wsss: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv[0] = f"wsss {command}"  # argparse's prog in usage lines
    if command in ("stage1", "stage2", "stage3"):
        result = globals()[command](rest)
        return 0 if result is None or isinstance(result, dict) else int(bool(result))
    return importlib.import_module(COMMANDS[command][0]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
