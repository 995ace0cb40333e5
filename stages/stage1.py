"""Stage 1: CAM classifier and adversarial erasing -> outputs/RUN/stage1/ (see wsss/erasing.py).
The same as `wsss stage1` once the package is installed."""
from wsss.cli import stage1 as main

if __name__ == "__main__":
    main()
