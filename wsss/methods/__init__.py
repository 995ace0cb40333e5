"""Stage-3 methods, registered in one typed table (`wsss.methods.registry`, as timm and
segmentation_models_pytorch register their models): `stages/stage3.py --method NAME` runs
`METHODS[NAME]`, a `Method`.

A method is one module whose entry point is registered with one decorator, and the module is
imported here (one line):

    @register("NAME", reads="pseudo", folders=("NAME",), args=add_args)
    def train(ctx) -> str: ...

    train:   the entry point. `ctx` is a `wsss.segtrain.Stage3`: the parsed args (every method's
             flags), the stage folder `ctx.out`, the datasets `ctx.train`, `ctx.val`, stage 2's
             folder `ctx.stage2`, and `ctx.train_net(folder, trainset, step_fn, ...)` (resume, the
             collapse check and the per-epoch val mIoU come with it) and `ctx.predict_train(...)`.
             It trains its nets with `ctx.train_net` and returns the folder of its final net,
             whose val predictions are the stage's product.
    folders: the top-level folders it writes inside the stage folder (what --force and a changed
             config remove before it runs again).
    reads:   "pseudo" (stage 2's artifacts, which must be complete: `ctx.stage2 / "pseudo"`,
             `"saliency"`) or "masks" (the training split's ground-truth masks).
    args:    optional add_args(parser): the method's own flags, named --NAME-..., its section
             of the flags (`wsss.config`): a run's config records those of its own method only,
             so another method's flags never make a finished run's settings differ.

A method imports the library (`wsss.segtrain`: training set, Stage3, cross-entropy step;
`wsss.predict`; `wsss.nets`), which never imports a method. A method kept outside the package needs
no edit here: register it before the parser is built,

    from wsss.methods import register
    register("mine", reads="pseudo", folders=("mine",))(my_train)

as tests/test_stage3.py does with a one-epoch method. (A dict entry of the older form,
`METHODS["mine"] = {"train": my_train, "reads": "pseudo", "folders": ("mine",)}`, is still taken and
checked the same way.)
"""
from __future__ import annotations

from wsss.methods import gt, psl, stc  # noqa: F401  (each registers its method when imported)
from wsss.methods.registry import METHODS, Method, register

__all__ = ["METHODS", "Method", "register"]
