"""Stage 3: segmentation net (--method: PSL, STC or any registered in wsss.methods) on stage 2's pseudo-masks
-> outputs/RUN/stage3/ (see wsss/segment.py).
The same as `wsss stage3` once the package is installed."""
from wsss.cli import stage3 as main

if __name__ == "__main__":
    main()
