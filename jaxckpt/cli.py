"""The ``jaxckpt`` command: ``verify``, ``ls``, ``show`` and ``convert``.

Every path may be an ``s3://``, ``gs://`` or ``az://`` URL; the object-store client is
configured from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ..., ``STORAGE_EMULATOR_HOST``, application-default
credentials, ``AZURE_STORAGE_ACCOUNT_NAME``, ``AZURE_STORAGE_ACCOUNT_KEY``, ...),
as the clouds' own command-line tools are.

A thin layer over the public API: ``show`` prints ``jaxckpt.inspect``, ``ls``
prints a read-only ``CheckpointManager``'s step records, and ``verify`` re-reads
every chunk of every shard through ``CheckpointReader.read(verify=True)`` in
bounded batches, so verifying a 500 GiB checkpoint needs a few hundred MiB of
memory, not 500 GiB.

Exit status: 0 all good; 1 a checkpoint failed verification or could not be
read (the message goes to stderr, or to the FAILED line of ``verify``); 2 a
usage error (bad arguments, a URL no store takes, a path that is not a
directory or has nothing there, nothing to verify).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pprint
import sys
from typing import Any, Sequence

import jaxckpt
from jaxckpt import display
from jaxckpt import format as fmt
from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointExistsError, DecryptionError, UnsupportedLocationError
from jaxckpt.verify import VERIFY_BATCH_BYTES, VerifyResult, error_message, verify_checkpoint  # noqa: F401 (public here)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line that cannot be acted on (exit status 2)."""


# ----------------------------------------------------------------------------- finding checkpoints
def is_checkpoint(path: str, follow: bool = False) -> bool:
    """A committed checkpoint (docs/FORMAT.md, commit protocol); ``follow``:
    ``path`` itself may be a symbolic link (one the user named)."""
    loc = storage.Location.parse(path)
    return storage.backend(loc).is_committed(loc, follow)


def _looks_damaged(path: str) -> bool:
    """A directory without a manifest that still holds data files (``*.bin``):
    a checkpoint whose manifest was lost, worth reporting rather than skipping."""
    try:
        with os.scandir(path) as it:
            return any(e.name.endswith(".bin") and not e.name.startswith(".") and e.is_file(follow_symlinks=False)
                       for e in it)
    except OSError:
        return False


def _natural_key(name: str) -> tuple:
    """Step directories in step order: ``2`` before ``10``, ``run_2`` before ``run_10``."""
    out: list[Any] = []
    digits = ""
    for ch in name + "\0":
        if ch.isdigit():
            digits += ch
            continue
        if digits:
            out.append((0, int(digits), ""))
            digits = ""
        if ch != "\0":
            out.append((1, 0, ch))
    return tuple(out)


def _check_location(path: str) -> str:
    """``path`` as given (a file:// URL: its local path), once it is known to be one this version can
    read (a URL of another scheme raises ``UnsupportedLocationError``; it never becomes a local path)."""
    loc = storage.Location.parse(path)
    return loc.path if loc.is_local else path


def _is_local(path: str) -> bool:
    return storage.Location.parse(path).is_local


def _require_dir(path: str) -> None:
    """A local ``path`` must be a directory, a bucket prefix must hold something (a bucket's root always does)."""
    loc = storage.Location.parse(path)
    if loc.is_local and not os.path.isdir(path):
        raise UsageError(f"{path}: no such directory" if not os.path.lexists(path) else f"{path}: not a directory")
    if not loc.is_local and "/" in loc.path and not storage.backend(loc).exists(loc):
        raise UsageError(f"{path}: not a directory (an object, not a prefix)" if _is_file(path) else
                         f"{path}: nothing there (no object under this prefix)")


def _is_file(path: str) -> bool:
    """Whether ``path`` is a single file: a local one, or an object (a safetensors, MindSpore or flax file)."""
    return os.path.isfile(path) if _is_local(path) else storage.is_file(path)


def _base_name(path: str) -> str:
    return storage.Location.parse(path).name


def find_checkpoints(path: str) -> tuple[bool, list[str]]:
    """``(is_single, paths)``: ``path`` itself when it is a checkpoint (or a
    checkpoint that lost its manifest), else its checkpoint subdirectories in
    step order. Hidden entries (temporary, deleted, set-aside directories) are
    never checkpoints."""
    path = _check_location(path)
    _require_dir(path)
    if is_checkpoint(path, follow=True) or (_is_local(path) and _looks_damaged(path)):
        return True, [path]
    if not _is_local(path):  # a bucket: the committed checkpoints one level down
        loc = storage.Location.parse(path)
        names = storage.backend(loc).list_committed(loc, lambda n: not n.startswith("."))
        return False, [str(loc.join(n)) for n in sorted(names, key=_natural_key)]
    found = []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
            sub = os.path.join(path, e.name)
            if is_checkpoint(sub) or _looks_damaged(sub):
                found.append(e.name)
    return False, [os.path.join(path, n) for n in sorted(found, key=_natural_key)]


def _cmd_verify(args: argparse.Namespace, out: Any, err: Any) -> int:
    is_single, paths = find_checkpoints(args.path)
    if not paths:
        raise UsageError(f"{args.path}: nothing to verify (no checkpoint here: no {fmt.MANIFEST_NAME} in it or "
                         "in its subdirectories)")
    progress = False if args.no_progress else (True if args.progress else None)
    failed = gone = 0
    for p in paths:
        res = verify_checkpoint(p, progress=progress, stream=err, encryption_key=_key(args))
        if res.ok:
            if not args.quiet:
                leaves = f"{res.leaves} leaf" if res.leaves == 1 else f"{res.leaves} leaves"
                print(f"OK  {p}  ({leaves}, {display.format_bytes(res.nbytes)})", file=out, flush=True)
        elif res.gone and not is_single:
            gone += 1
            if not args.quiet:
                print(f"GONE  {p}: deleted while being verified (rotated away by a running manager?)",
                      file=out, flush=True)
        else:
            failed += 1
            print(f"FAILED  {p}: {res.error}", file=out, flush=True)
    if not is_single and not args.quiet:
        checked = len(paths) - gone
        print(f"{checked - failed} of {checked} checkpoints OK" + (f", {failed} FAILED" if failed else ""), file=out)
    return EXIT_FAILED if failed else EXIT_OK


# ----------------------------------------------------------------------------- ls
def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _format_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{k}={_format_value(v)}" for k, v in metrics.items())


def _records(mgr: jaxckpt.CheckpointManager, steps: list[int]) -> list[Any]:
    """Each step's record, or the error reading it raised; up to 16 manifests
    read at once (in a bucket each is a round trip)."""
    def one(step: int) -> Any:
        try:
            return mgr.metadata(step)
        except (CheckpointError, OSError) as e:
            return e
    if len(steps) < 2:
        return [one(s) for s in steps]
    with concurrent.futures.ThreadPoolExecutor(min(16, len(steps)), thread_name_prefix="jaxckpt-ls") as pool:
        return list(pool.map(one, steps))


def _cmd_ls(args: argparse.Namespace, out: Any, err: Any) -> int:
    d = _check_location(args.dir)
    _require_dir(d)
    if is_checkpoint(d, follow=True):
        raise UsageError(f"{d} is a checkpoint, not a directory of checkpoints; try: jaxckpt show {d}")
    rows, records, failed = [], [], 0
    try:
        mgr = jaxckpt.CheckpointManager(d, read_only=True, step_format=args.step_format, step_prefix=args.step_prefix,
                                        encryption_key=_key(args))
    except (ValueError, TypeError) as e:  # a malformed --step-format / --step-prefix
        raise UsageError(str(e)) from None
    with mgr:
        steps = mgr.all_steps()
        for step, meta in zip(steps, _records(mgr, steps)):
            if isinstance(meta, DecryptionError):  # listed by name; its record is sealed
                keyed = _key(args) is not None  # a key that does not open it is a failure, not a missing option
                failed += keyed
                rows.append([str(step), "?", "?", "?", "?", "WRONG KEY" if keyed else "encrypted (--key-file to show)"])
                records.append({"step": step, "encrypted": True, "error": error_message(meta)})
                continue
            if isinstance(meta, Exception):
                failed += 1
                print(f"jaxckpt ls: step {step}: {error_message(meta)}", file=err)
                rows.append([str(step), "?", "?", "?", "?", "UNREADABLE"])
                records.append({"step": step, "error": error_message(meta)})
                continue
            rows.append([str(step), "-" if meta.epoch is None else str(meta.epoch), display.local_time(meta.timestamp, sep="T"),
                         display.format_bytes(meta.nbytes), _format_metrics(meta.metrics), meta.reason or "-"])
            records.append({"step": meta.step, "epoch": meta.epoch, "timestamp": meta.timestamp,
                            "time": display.local_time(meta.timestamp, sep="T"), "nbytes": meta.nbytes, "metrics": meta.metrics,
                            "reason": meta.reason, "metadata": meta.metadata, "path": meta.path,
                            "jax_version": meta.jax_version, "jaxckpt_version": meta.jaxckpt_version})
    if args.json:
        print(json.dumps(display.jsonable(records), indent=2), file=out)
    elif rows:
        display.text_table([["STEP", "EPOCH", "TIME", "SIZE", "METRICS", "REASON"]] + rows, out)
    else:
        others = find_checkpoints(d)[1]
        hint = (f" ({len(others)} checkpoint directories are not named by step, e.g. "
                f"{_base_name(others[0])!r}: see --step-format)") if others else ""
        print(f"{d}: no committed checkpoints{hint}", file=err)
    return EXIT_FAILED if failed else EXIT_OK


# ----------------------------------------------------------------------------- show
def _leaf_row(leaf: jaxckpt.LeafInfo) -> list[str]:
    if leaf.kind == "value":
        value = repr(leaf.value)
        return [leaf.path, "-", type(leaf.value).__name__, value if len(value) <= 40 else value[:37] + "..."]
    dtype = f"key<{leaf.dtype}>" if leaf.kind == "key" else str(leaf.dtype)
    return [leaf.path, str(tuple(leaf.shape)), dtype, display.format_bytes(leaf.nbytes)]


def _cmd_show(args: argparse.Namespace, out: Any, err: Any) -> int:
    p = _check_location(args.path)
    if not is_checkpoint(p, follow=True) and not _is_file(p):  # a MindSpore, safetensors or flax file is shown as is
        _require_dir(p)
        is_single, found = find_checkpoints(p)
        if found and not is_single:
            names = ", ".join(_base_name(x) for x in found[-5:])
            raise UsageError(f"{p} is a directory of checkpoints ({names}); show one of them, e.g. "
                             f"jaxckpt show {found[-1]}")
    info = jaxckpt.inspect(p, encryption_key=_key(args), dec_key=_read_key(args.dec_key_file), dec_mode=args.dec_mode)
    if args.json:
        doc = {"path": info.path, "format_version": info.format_version, "library": info.library,
               "created": info.created, "total_bytes": info.total_bytes, "metadata": info.metadata,
               "leaves": [{"path": x.path, "kind": x.kind, "shape": list(x.shape), "dtype": x.dtype,
                           "nbytes": x.nbytes, **({"value": x.value} if x.kind == "value" else {})}
                          for x in info.leaves]}
        print(json.dumps(display.jsonable(doc), indent=2), file=out)
        return EXIT_OK
    print(info.path, file=out)
    if info.format_version is None:  # a foreign format
        print(f"  {info.library} checkpoint", file=out)
    else:
        print(f"  format v{info.format_version}, written by {info.library}, "
              f"created {display.local_time(info.created, sep='T')}", file=out)
    print(f"  {len(info.leaves)} leaves, {display.format_bytes(info.total_bytes)}", file=out)
    print(file=out)
    if info.leaves:
        display.text_table([["KEY PATH", "SHAPE", "DTYPE", "SIZE"]] + [_leaf_row(x) for x in info.leaves], out)
        print(file=out)
    if info.metadata is None:
        print("metadata: none", file=out)
    else:
        print("metadata:", file=out)
        for line in pprint.pformat(info.metadata, width=96, sort_dicts=False).splitlines():
            print("  " + line, file=out)
    return EXIT_OK


# ----------------------------------------------------------------------------- keys, convert
KEY_FILE_ENV = "JAXCKPT_KEY_FILE"


def _key(args: argparse.Namespace) -> bytes | None:
    """The key of encrypted checkpoints: ``--key-file``, else ``$JAXCKPT_KEY_FILE``, else none."""
    return _read_key(args.key_file or os.environ.get(KEY_FILE_ENV) or None)


def _read_key(path: str | None) -> bytes | None:
    """A key file's raw bytes (a trailing newline after 16, 24 or 32 bytes is dropped)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read(4096)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the key file: {e.strerror}") from None
    return key.rstrip(b"\r\n") if len(key.rstrip(b"\r\n")) in (16, 24, 32) else key


def _cmd_convert(args: argparse.Namespace, out: Any, err: Any) -> int:
    src, dst = _check_location(args.src), _check_location(args.dst)
    progress = False if args.no_progress else (True if args.progress else None)
    try:
        jaxckpt.convert(src, dst, to=args.to, format=args.from_format, dec_key=_read_key(args.dec_key_file),
                        dec_mode=args.dec_mode, enc_key=_read_key(args.enc_key_file), enc_mode=args.enc_mode,
                        progress=progress, encryption_key=_key(args), new_encryption_key=_read_key(args.new_key_file),
                        overwrite=args.overwrite)
    except CheckpointExistsError as e:  # the option's name here, not the keyword's
        raise CheckpointExistsError(str(e).replace("pass overwrite=True, or --overwrite on the command line,",
                                                   "pass --overwrite").replace("overwrite=True", "--overwrite")) from None
    print(f"wrote {dst} ({args.to})", file=out)
    return EXIT_OK


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxckpt", description="Inspect and verify jaxckpt checkpoints.",
                     epilog="Exit status: 0 ok, 1 a checkpoint failed or could not be read, 2 usage error.")
    parser.add_argument("--version", action="version", version=f"jaxckpt {jaxckpt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("verify", help="re-read and re-hash every byte of a checkpoint or a directory of checkpoints",
                       description="Re-read every chunk of every shard and check its XXH3 checksum. PATH is a "
                                   "checkpoint, or a directory of checkpoints (a CheckpointManager's directory): "
                                   "each is verified. Prints 'OK  <path>  (<n> leaves, <size>)' or "
                                   "'FAILED  <path>: <reason>' per checkpoint; exits 1 if any failed.")
    p.add_argument("path", metavar="PATH")
    _key_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    bar.add_argument("--progress", action="store_true",
                     help="draw a progress bar on stderr even when it is not a terminal")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("ls", help="list the committed steps of a CheckpointManager directory",
                       description="List committed steps: step, epoch, time (local), size, metrics, reason. "
                                   "Reads manifests only.")
    p.add_argument("dir", metavar="DIR")
    _key_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--step-format", default=None, help="the manager's step_format (default '{step}')")
    p.add_argument("--step-prefix", default=None, help="the manager's step_prefix")
    p.set_defaults(run=_cmd_ls)

    p = sub.add_parser("show", help="the leaves (key path, shape, dtype, size) and metadata of a checkpoint",
                       description="Print a checkpoint's leaves and metadata from its manifest (no array data "
                                   "is read).")
    p.add_argument("path", metavar="PATH")
    _key_option(p)
    _dec_options(p, "an encrypted MindSpore file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_show)

    _add_convert(sub)
    return parser


def _key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", default=None, help=f"the key (16, 24 or 32 raw bytes) of encrypted jaxckpt "
                                                    f"checkpoints (default: ${KEY_FILE_ENV})")


def _dec_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dec-key-file", default=None, help=f"key of {what} (raw bytes)")
    p.add_argument("--dec-mode", default="AES-GCM", choices=("AES-GCM", "AES-CBC", "SM4-CBC"))


def _add_convert(sub: Any) -> None:
    formats = ("jaxckpt", "orbax", "flax", "mindspore", "safetensors")
    p = sub.add_parser("convert", help="convert a checkpoint between jaxckpt, orbax, flax, MindSpore and safetensors",
                       description="Read SRC (any supported format, detected unless --from is given) and write it "
                                   "as a new checkpoint DST in the format --to (default jaxckpt). Either may be a "
                                   "local path or an s3://, gs:// or az:// URL (an orbax DST: a local directory). An existing "
                                   "DST is refused unless --overwrite.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    _key_option(p)
    p.add_argument("--new-key-file", default=None, help="encrypt DST (jaxckpt) with this key instead: key rotation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (a jaxckpt, safetensors or "
                                                             "MindSpore one; atomically)")
    p.add_argument("--to", default="jaxckpt", choices=("jaxckpt", "orbax", "safetensors", "mindspore"))
    p.add_argument("--from", dest="from_format", default=None, choices=formats, help="the format of SRC")
    _dec_options(p, "an encrypted MindSpore SRC")
    p.add_argument("--enc-key-file", default=None, help="encrypt a MindSpore DST with this key (raw bytes)")
    p.add_argument("--enc-mode", default="AES-GCM", choices=("AES-GCM", "AES-CBC", "SM4-CBC"))
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    bar.add_argument("--progress", action="store_true", help="draw a progress bar on stderr even when it is not a "
                                                             "terminal")
    p.set_defaults(run=_cmd_convert)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse already reported
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    out, err = sys.stdout, sys.stderr
    try:
        return args.run(args, out, err)
    except (UsageError, UnsupportedLocationError) as e:  # UnsupportedLocationError: a path no store takes
        print(f"jaxckpt {args.command}: {e}", file=err)
        return EXIT_USAGE
    except (CheckpointError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `jaxckpt ls | head`: the reader went away, not an error of ours
            _silence_stdout()
            return EXIT_FAILED
        print(f"jaxckpt {args.command}: {error_message(e)}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"jaxckpt {args.command}: interrupted", file=err)
        return 130


def _silence_stdout() -> None:
    # Python flushes stdout at exit; with the pipe closed that would print a second error.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
