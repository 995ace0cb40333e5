"""The life of a stage folder `OUTPUTS/RUN/STAGE`: open (lock, compare, resume or skip), finish.

One rule for every stage, `wsss.predict` and the report, because a user's hours of work hang on it:

- **Lock.** An advisory `fcntl` lock on `STAGE/.lock` (holding the owner's pid) for as long as the
  stage runs: a second process on the same folder stops with the holder's pid. The kernel drops the
  lock when its process dies, so a `kill -9` leaves no stale lock. Under torchrun only rank 0 locks:
  the ranks of one job share the folder. A `--force` run also holds the locks of the stages that
  read its artifacts (stage 1 -> 2 -> 3), so it is refused while one of them runs, and none starts
  on artifacts being removed and rewritten.
- **Compare.** `stage.json` records the artifact config and the input fingerprints the folder's
  artifacts belong to; it is written before the first artifact. Only *artifact* flags are config.
  *Runtime* flags (device, workers, overlays, where the outputs go) and stage 3's *test-time* flags
  (whose predictions go to a folder named by them) are declared as such where they are defined, with
  `wsss.run.runtime(...)` / `test_time(...)`, and never invalidate anything; stage 3 records only its
  method's flags, and a flag added since a run was made is no change at its declared default
  (`wsss.config`).
- **Never delete silently.** A different config or changed inputs stop the stage before it touches
  anything, with the differences (old -> new) and what to do. `--force` removes, and names, only
  the files the stage itself wrote: every write through `wsss.io` under a locked stage folder is
  recorded in its journal (`.written`, io.journal) before it lands, so a user's `step_notes.txt`
  or `regions/README.txt` stays whatever its name. (A folder of a version before journals goes by
  the stage's `owned` glob patterns.)
- **Resume or skip.** Same config and inputs: a finished stage (complete manifest) is skipped, an
  unfinished one resumes from the artifacts already written.
- **Finish.** The manifest (`io.write_manifest`) is written last, then the lock is released; a stage
  that fails never reaches it.

Input fingerprints: small files (lists, labels, class names, upstream manifests) by content; the
images, masks and maps a stage reads (and the masks or annotations the image labels come from when
there is no cls_labels.npy) by size + mtime, because hashing the 10,582 JPEGs of train_aug
(1.3 GB) on every start costs tens of seconds while a stat each costs well under one, and an edited
or replaced file gets a new mtime. Upstream stage folders are fingerprinted by their manifest, which
carries its finishing time: a redone stage 1 invalidates stages 2 and 3.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os

try:
    import fcntl
except ImportError:  # Windows: no advisory locks of this kind
    fcntl = None
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsss import io, layout, tblog
from wsss.config import artifact_config, compare, flags
from wsss.errors import DatasetError, StageError, WsssError
from wsss.run import (
    environment,
    is_main_process,
    is_safe_name,
    phase_times,
    rank_world,
    run_dir,
    seed_everything,
    setup_logging,
)

log = logging.getLogger("wsss")
STAMP, LOCK, CONFIG = layout.STAMP, layout.LOCK, layout.CONFIG
_held: dict[Path, int] = {}  # lock file -> open descriptor, for this process


def check_processes(batch_size: int) -> None:
    """Training splits the global --batch-size over torchrun's processes (each takes an equal share,
    so that W processes train as one does): a count that does not divide it stops the stage before
    any work, naming the counts that do."""
    world = rank_world()[1]
    if batch_size % world:
        counts = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
        raise StageError(f"--batch-size {batch_size} does not split over {world} processes: run "
                         f"{', '.join(map(str, counts))} processes, or pass a --batch-size that {world} divides "
                         f"(with --lr scaled as the batch, for the same training)")


# ---------------------------------------------------------------- fingerprints

STAMP_VERSION = 2  # 2: stat fingerprints of absolute paths, list files by their ids (not their bytes)


class TextList(os.PathLike):
    """An input read as a list of lines (a split's list file): fingerprinted by its lines, so that
    line endings (CRLF), blank lines and trailing spaces, which read_ids ignores, are no change."""

    def __init__(self, path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)


def stat_fingerprint(paths, legacy: bool = False) -> str:
    """Size + mtime of each file (see the module docstring for why not the contents), named by its
    absolute path, so that `--data data/x`, `./data/x/` and `/abs/data/x` agree (`legacy`: by the
    path as given, as stamps before STAMP_VERSION 2 did)."""
    h = hashlib.sha256()
    for p in paths:
        name = p if legacy else os.path.abspath(p)
        try:
            st = os.stat(p)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{name}:missing\n".encode())
    return h.hexdigest()[:16]


def text_fingerprint(path: Path) -> str:
    """The non-blank lines of a text file, stripped ("missing" and undecodable files hash apart)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return io.fingerprint(path)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return io.fingerprint(path)
    lines = "".join(line.strip() + "\n" for line in text.splitlines() if line.strip())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def fingerprints(inputs: dict, legacy: bool = False) -> dict:
    """{name: fingerprint}: a path by content (a folder by its manifest, a TextList by its lines), a
    list of paths by stat. `legacy`: as stamps before STAMP_VERSION 2 computed them."""
    def one(value):
        if isinstance(value, list | tuple):
            return stat_fingerprint(value, legacy)
        if isinstance(value, TextList):
            return io.fingerprint(value.path) if legacy else text_fingerprint(value.path)
        return io.fingerprint(value)

    return {k: one(v) for k, v in sorted(inputs.items())}


def dataset_inputs(dataset, masks: bool = False, prefix: str = "") -> dict:
    """What a stage reads of a split: list, labels file, class names, every image (and mask)."""
    inputs = {f"{prefix}list": TextList(dataset.list_path), f"{prefix}labels": dataset.root / "cls_labels.npy",
              f"{prefix}class names": dataset.root / "class_names.txt",
              f"{prefix}images": [dataset.image_path(i) for i in dataset.ids]}
    if masks and dataset.mask_dir is not None:
        inputs[f"{prefix}masks"] = [dataset.mask_path(i) for i in dataset.ids]
    if dataset._labels is None:  # no cls_labels.npy: the image labels come from the masks or annotations
        from_masks = [dataset.mask_path(i) for i in dataset.ids if dataset.has_mask(i)]
        from_xml = [dataset.root / "Annotations" / f"{i}.xml" for i in dataset.ids if not dataset.has_mask(i)]
        if from_masks:
            inputs[f"{prefix}label masks"] = from_masks
        if from_xml:
            inputs[f"{prefix}annotations"] = from_xml
    return inputs


DATASET_KEYS = ("class names", "labels", "list")  # what makes two splits the same dataset (never --limit)


def check_same_dataset(upstream: Path, dataset, who: str, keys=DATASET_KEYS) -> None:
    """The stages of a run read one dataset: `who`'s split must have the class names, labels file and
    list that stage `upstream` recorded, else it stops before any work (the same photos imported with
    another class order would train every class under another's name). Silent when `upstream` has
    no manifest, or recorded none of these (seeds made elsewhere). `keys`: what to compare (another
    split of the same dataset has its own list, the same class names and labels file)."""
    manifest = _read(Path(upstream) / io.MANIFEST)
    recorded = (manifest or {}).get("inputs", {})
    inputs = {k: v for k, v in dataset_inputs(dataset).items() if k in keys and k in recorded}
    now, legacy = fingerprints(inputs), fingerprints(inputs, legacy=True)
    differ = [k for k in inputs if recorded[k] not in (now[k], legacy[k])]
    if differ:
        config = manifest.get("config", {})
        raise StageError(f"{who}: the dataset {dataset.root} (split '{dataset.split}') is not the one {upstream} "
                         f"read ({config.get('data', '?')}, split '{config.get('train_split', '?')}'): its "
                         f"{', '.join(differ)} differ. Pass that stage's --data and --train-split, or start "
                         f"another --run")


# inputs the stamps before STAMP_VERSION 2 did not record: such a stamp without one is no change
LATER_INPUTS = ("label masks", "annotations")


# ---------------------------------------------------------------- the lock

def lock(folder: Path, what: str, *, busy: str | None = None, writes: bool = True) -> None:
    """Hold folder/.lock for this process (see the module docstring); a held lock is an error,
    `busy` its message (after "FOLDER: ", with {pid} for the holder's) if given. `writes`: this
    process writes there, and records what (io.journal)."""
    if writes:
        io.journal(folder)  # every rank records what it writes there (what --force removes)
    if not is_main_process():
        return
    path = Path(folder) / LOCK
    release(folder)  # a lock this process already holds (an earlier stage run in the same process)
    if writes:
        io.journal(folder)
    if fcntl is None:
        raise StageError(f"{folder}: run folders are locked with fcntl, which this system ({os.name}) lacks; "
                         f"run wsss on Linux or macOS (on Windows: in WSL)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if writes:
            io.journal(folder, on=False)
        message = (busy or "{what} is already running here (pid {pid}); wait for it to finish, or use "
                   "another --run").format(what=what, pid=holder)
        raise StageError(f"{folder}: {message}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd


def stage_folders(run: Path) -> list[Path]:
    """The stage folders of a run (stage1, stage2, stage3, stage3-TAG...): its subfolders named
    stage*, or holding a stage's stamp, manifest or lock."""
    run = Path(run)
    if not run.is_dir():
        return []
    return sorted(p for p in run.iterdir() if p.is_dir() and (
        layout.is_stage_name(p.name) or any((p / f).exists() for f in (STAMP, io.MANIFEST, LOCK))))


def downstream(run: Path, name: str) -> list[Path]:
    """The stage folders of `run` that read stage `name`'s artifacts (stage 1 -> 2 -> 3, 3-TAG)."""
    later = layout.READ_BY.get(name, ())
    if not later or not run.is_dir():
        return []
    return sorted(p for p in run.iterdir() if p.is_dir() and any(
        p.name == n or (n == layout.STAGE3 and layout.is_stage3(p.name)) for n in later))


def lock_downstream(out: Path, name: str) -> list[Path]:
    """--force: hold the locks of the stages that read this one while it is redone, so that none of
    them runs on artifacts being removed and rewritten (one running now refuses the --force)."""
    held = []
    try:
        for folder in downstream(out.parent, name):
            lock(folder, name, writes=False,
                 busy=f"a stage or wsss.predict is running on this run's {name} (pid {{pid}}); --force would "
                      f"remove and rewrite what it reads: wait for it to finish, or use another --run")
            held.append(folder)
    except BaseException:
        for folder in held:
            release(folder)
        raise
    return held


def release(folder: Path) -> None:
    io.journal(folder, on=False)
    fd = _held.pop(Path(folder) / LOCK, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


# ---------------------------------------------------------------- opening and finishing

@dataclass
class Stage:
    """An open stage folder: its config, its inputs' fingerprints, and when it started."""

    path: Path
    config: dict
    inputs: dict
    started: float = field(default_factory=time.time)
    manifest: dict | None = None  # the complete manifest of a finished stage (stage 3 adds predictions)
    environment: dict | None = None  # wsss.run.environment: device, GPU, versions, commit
    held: list = field(default_factory=list)  # the downstream stages' folders locked by --force

    def finish(self, outputs: dict) -> dict:
        """Write the manifest (the stage is complete) and release the locks."""
        manifest = None
        tblog.stop()
        phases = phase_times()
        if phases:
            log.info("phases: %s", ", ".join(f"{k} {v['seconds']:.1f} s" + (f" ({v['images']} images)" if v["images"]
                                                                              else "") for k, v in phases.items()))
            outputs = {**outputs, "phases": phases}
        if is_main_process():
            manifest = io.write_manifest(self.path, self.config, outputs=outputs, started=self.started,
                                         fingerprints=self.inputs, environment=self.environment)
        for folder in self.held:
            release(folder)
        release(self.path)
        return manifest


def _read(path: Path):
    try:
        return io.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable ({e}); move it away or pass --force") from e


def owned_entries(folder: Path, owned) -> list[Path]:
    """The entries of `folder` holding what the stage wrote: the top-level entries of its journal
    (io.journal), or for a folder written before journals, those its `owned` glob patterns match."""
    written = io.journaled(folder)
    if written is not None:
        return sorted({folder / Path(rel).parts[0] for rel in written if (folder / rel).exists()})
    legacy = ("state.json", "started.json")  # the stamps of versions before this module
    found = {p for pattern in (*owned, STAMP, io.MANIFEST, CONFIG, *legacy) for p in folder.glob(pattern)}
    return sorted(found)


def remove_owned(folder: Path, owned) -> list[str]:
    """--force: remove the files the stage wrote (its journal) and the folders they leave empty;
    everything else stays. A folder written before journals goes by the `owned` patterns."""
    if io.journaled(folder) is not None:
        return io.remove_journaled(folder)
    ours = owned_entries(folder, owned)
    if ours:
        log.warning("--force: %s holds no record of the files written there (an older version wrote it); "
                    "removing the entries named as the stage's: %s", folder, ", ".join(p.name for p in ours))
    for p in ours:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return [p.name for p in ours]


def remove_temp_files(folder: Path) -> None:
    """Remove the temporary files of writes a kill cut short (io.atomic_path's `.NAME.XXXXXXXX.tmp`)
    in the stage folder, which this process has locked; no other file, whatever its name."""
    for path in folder.rglob(".*.tmp"):
        if io.TEMP_FILE.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


def open_stage(args, name: str, inputs: dict, owned=(), *, done=None, sections=None) -> Stage | None:
    """Open OUTPUTS/RUN/name for a run with `args`; None when it is complete and `done()` agrees.

    `inputs` {name: path or [paths]} (see fingerprints); `owned`: glob patterns of what the stage
    writes (what --force removes); `done(manifest)`: for stage 3, whether this run's test-time
    predictions are in the manifest too (a complete stage without them goes on, keeping its nets);
    `sections`: the flag sections of this run (stage 3: its method's), whose flags alone, beside the
    flags of no section, are its config (`wsss.config`).
    """
    for flag in ("run", "tag"):
        value = getattr(args, flag, "")
        if value and not is_safe_name(value):
            raise StageError(f"--{flag} {value!r}: use letters, digits and -_. only (no '/', no '..')")
    out = run_dir(args) / name
    main = is_main_process()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StageError(f"{out}: cannot create the stage folder ({e.strerror})") from e
    lock(out, name)
    held = []
    try:
        if args.force:
            held = lock_downstream(out, name)
        setup_logging(out, name)
        opened = _compare(args, name, out, inputs, owned, done, main, sections)
        if main:
            remove_temp_files(out)
    except BaseException:
        for folder in held:
            release(folder)
        release(out)
        raise
    if opened is None:
        for folder in held:
            release(folder)
        release(out)
        return None
    opened.held = held
    log.info("%s config: %s", name, opened.config)
    opened.environment = environment(args)
    log.info("%s runs on %s (%s), precision %s; %s", name, opened.environment.get("gpu", opened.environment["device"]),
             opened.environment["device_reason"], opened.environment["amp"],
             ", ".join(f"{k} {opened.environment[k]}" for k in ("torch", "cuda", "cudnn", "git_commit")))
    if main:
        io.write_json(out / STAMP, {"config": opened.config, "inputs": opened.inputs, "version": STAMP_VERSION})
        io.write_json(out / CONFIG, flags(args))
    seed_everything(args.seed, getattr(args, "deterministic", False))
    if getattr(args, "tensorboard", False) and main:
        tblog.start(out)
    return opened


def _compare(args, name: str, out: Path, inputs: dict, owned, done, main: bool, sections=None) -> Stage | None:
    config, prints = artifact_config(args, sections), fingerprints(inputs)
    stamp = _read(out / STAMP)
    manifest = _read(out / io.MANIFEST)
    ours = owned_entries(out, owned)
    if args.force:
        if ours and main:
            log.warning("--force: removing %s from %s (what the stage wrote there; nothing else)",
                        ", ".join(p.name for p in ours), out)
            remove_owned(out, owned)
        return Stage(out, config, prints)
    if stamp is None:
        if [p for p in ours if p.name != CONFIG]:
            raise StageError(f"{out}: holds artifacts of an unknown config (no {STAMP}, made by an older "
                             f"version?); nothing was changed. Pass --force to redo it in place (removes "
                             f"{', '.join(p.name for p in ours)}), or use another --run")
        return Stage(out, config, prints)
    if main and ours and io.journaled(out) is None:
        # a folder of a version before journals, about to be resumed or skipped: its files are recorded
        # as the stage's (by its `owned` patterns), so that a later --force leaves none of them behind
        io.record_existing(out, ours)
    changed = compare(args, stamp.get("config", {}), sections)[1]
    old_inputs = stamp.get("inputs", {})
    older = stamp.get("version", 1) < STAMP_VERSION
    later = {k for k in prints if older and k not in old_inputs and k.endswith(LATER_INPUTS)}
    before = fingerprints(inputs, legacy=True) if older else {}
    moved = [f"  {k}" for k in sorted(set(old_inputs) | set(prints) - later)
             if old_inputs.get(k) != prints.get(k) and (k not in before or old_inputs.get(k) != before[k])]
    if (changed or moved) and not _made_anything(ours):
        log.info("%s: nothing was made with the earlier settings (a start that failed); going on with these", out)
        changed = moved = []
    if changed or moved:
        what = "finished" if manifest and manifest.get("complete") else "started"
        lines = [f"{out}: {name} was {what} with other settings or inputs; nothing was changed."]
        if changed:
            lines += ["Flags that differ (old -> new):", *changed]
        if moved:
            lines += ["Inputs changed since (an edited list, labels, class names, images or masks, "
                      "or a redone earlier stage):", *moved]
        lines.append(f"To redo it in place pass --force (removes {', '.join(p.name for p in ours)}); "
                     f"to keep it, use another --run.")
        raise StageError("\n".join(lines))
    stage = Stage(out, config, prints)
    if manifest and manifest.get("complete"):
        stage.manifest = manifest
        if done is None or done(manifest):
            log.info("%s is complete in %s with this config and these inputs; skipping (--force redoes it)",
                     name, out)
            return None
    return stage


def _made_anything(entries) -> bool:
    """Whether a stage's own entries hold any file but its config and stamp (a start that failed before its
    first artifact leaves none, and must not block a retry with other flags)."""
    for entry in entries:
        if entry.name in (CONFIG, STAMP):
            continue
        if entry.is_file() or any(f.is_file() for f in entry.rglob("*")):
            return True
    return False


def error_line(e: BaseException) -> str | None:
    """One line for a failure the user can fix (bad input, a full disk...), None for a bug."""
    if isinstance(e, DatasetError):
        return e.message
    if isinstance(e, WsssError):
        return str(e).strip()
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot write {e.filename or 'the outputs'}: {e.strerror or os.strerror(e.errno)}"
    return None


def main(run, parser: argparse.ArgumentParser, argv=None):
    """Parse, run, and turn a failure the user can fix into one line on stderr (exit status 1)."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Exception as e:
        line = error_line(e)
        if line is None:
            raise
        raise SystemExit(f"error: {line}") from e
