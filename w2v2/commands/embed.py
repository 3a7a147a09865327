"""``w2v2 embed``: hidden states of chosen layers, one file per input (or one combined file).

Per input ``KEY`` (the manifest's ``path``, the path under a given directory, or the file name,
without extension):

- ``--format safetensors``: ``DIR/KEY.safetensors`` with tensors ``features`` ((layers, dim) for
  ``--pool mean``, (layers, frames, dim) for ``--pool none``) and, for ``--pool none``,
  ``frame_times`` (frames,) in seconds; string metadata ``model``, ``layers`` (JSON list),
  ``pool``, ``source``, ``num_frames``, ``frame_shift``, ``receptive_field``.
- ``--format npy``: ``DIR/KEY.npy`` (``features``) and ``DIR/KEY.json`` with the same metadata
  (and ``frame_times`` for ``--pool none``).

``--output FILE`` instead writes one safetensors file for all inputs, in input order:
``features`` (files, layers, dim) for ``--pool mean``; for ``--pool none`` the frames of all files
concatenated, ``features`` (layers, total frames, dim), ``frame_times`` (total frames,) and
``offsets`` (files + 1,): file i has frames ``offsets[i]:offsets[i+1]``. Metadata ``keys`` and
``sources`` (JSON lists) name the files. Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save as _st_save
from tqdm import tqdm

from ..distributed import dist_info
from ..errors import UsageError, UserError
from ..fileio import OutputError, atomic_write_bytes, atomic_write_files, make_folder
from ..shard import gather, my_share
from ._options import add_shared
from ._shared import check_output_target, load_cli_model, nothing_more_can_be_written


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="audio/video files, directories (searched recursively) or .tsv manifests "
                             "(a 'path' column, relative to the manifest)")
    add_shared(parser, "--model")
    add_shared(parser, "--layers")
    parser.add_argument("--pool", choices=["mean", "none"], default="mean",
                        help="mean over frames -> (layers, dim), or none -> (layers, frames, dim) with frame times")
    parser.add_argument("--format", choices=["safetensors", "npy"], default="safetensors",
                        help="file format of --output-dir's files (see the module's documentation)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-dir", help="one file per input here (subdirectories mirror the input names)")
    out.add_argument("--output", help="one combined safetensors file for all inputs")
    add_shared(parser, "--batch-size", "--device", "--progress", "--skip-existing")


def run(args) -> int:
    from ..embed import embed, frame_shift, item_seconds, receptive_field, resolve_inputs, resolve_layers

    if args.output and args.format != "safetensors":
        raise UserError("--output writes one safetensors file; use --output-dir for --format npy")
    if args.output and (args.skip_existing or dist_info().world_size > 1):
        raise UsageError("--output writes one file for all inputs; --skip-existing and several processes "
                         "need --output-dir (one file per input)")
    items = resolve_inputs(args.inputs)
    if not items:
        raise UserError(f"no audio files found in {' '.join(args.inputs)}")
    check_output_target(args.output_dir or args.output, folder=args.output_dir is not None,
                        option="--output-dir" if args.output_dir else "--output")
    items = [items[i] for i in my_share(items, item_seconds)]  # under torchrun: this rank's part
    skipped = 0
    if args.skip_existing:
        todo = [it for it in items if not outputs_exist(it, Path(args.output_dir), args.format)]
        skipped, items = len(items) - len(todo), todo
    model = load_cli_model(args, with_quantizer=False)
    layers = resolve_layers(args.layers, model.config.num_hidden_layers)
    meta = {"model": args.model or "default", "layers": json.dumps(layers), "pool": args.pool,
            "frame_shift": repr(frame_shift(model)), "receptive_field": repr(receptive_field(model))}
    done, failed, previous = [], 0, None
    bar = tqdm(total=len(items), unit="file", disable=not args.progress or None, file=sys.stderr)
    for seen, e in enumerate(embed(model, items, layers=layers, pool=args.pool, batch_size=args.batch_size), 1):
        bar.update(1)
        if not e.ok:
            failed += 1
            tqdm.write(f"w2v2 embed: error: {e.error} (skipped)", file=sys.stderr)
        elif args.output:
            done.append(e)
        else:
            try:
                write_one(e, Path(args.output_dir), args.format, meta)
                previous = None
            except OutputError as err:  # this input only, unless nothing more can be written
                failed += 1
                tqdm.write(f"w2v2 embed: error: {e.item.name}: {err}", file=sys.stderr)
                if nothing_more_can_be_written(err, previous):
                    tqdm.write(f"w2v2 embed: stopping: nothing more can be written ({err.strerror})", file=sys.stderr)
                    failed += len(items) - seen  # not embedded
                    break
                previous = err
    bar.close()
    if args.output and done:
        done.sort(key=lambda e: e.index)
        atomic_write_bytes(args.output, combined_bytes(done, args.pool, meta))
    total, failed, skipped = (sum(n) for n in zip(*gather((len(items), failed, skipped))))  # the whole job's
    if dist_info().is_main:
        where = args.output or args.output_dir
        print(f"{total - failed} of {total} files embedded to {where}"
              + (f"; {skipped} skipped, their outputs exist" if skipped else "")
              + (f"; {failed} failed (see above)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def outputs_exist(item, out_dir: Path, fmt: str) -> bool:
    """Whether ``write_one`` wrote this input's files (each is written whole or not at all)."""
    path = out_dir / f"{item.key}.{fmt}"
    return path.is_file() and (fmt != "npy" or path.with_suffix(".json").is_file())


def st_save(tensors: dict, metadata: dict) -> bytes:
    """safetensors bytes that depend only on the tensors and metadata: the header's keys sorted
    (safetensors writes the metadata in a hash map's order, which changes from process to process)."""
    data = _st_save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format's alignment of the data that follows
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def write_one(e, out_dir: Path, fmt: str, meta: dict) -> Path:
    """Write one :class:`~w2v2.embed.Embedding` as ``out_dir/KEY.safetensors`` or ``.npy`` + ``.json``."""
    meta = {**meta, "source": e.item.name, "num_frames": str(e.num_frames)}
    path = out_dir / f"{e.item.key}.{fmt}"
    if not path.resolve().is_relative_to(out_dir.resolve()):  # keys are made relative; never write elsewhere
        raise ValueError(f"{e.item.name}: output name {e.item.key!r} leaves the output directory")
    make_folder(path.parent)
    if fmt == "safetensors":
        tensors = {"features": e.features}
        if e.frame_times is not None:
            tensors["frame_times"] = e.frame_times
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
        return path
    buf = io.BytesIO()
    np.save(buf, e.features)
    side = {k: (json.loads(v) if k in ("layers", "num_frames", "frame_shift", "receptive_field") else v)
            for k, v in meta.items()}
    side["shape"] = list(e.features.shape)
    if e.frame_times is not None:
        side["frame_times"] = [round(float(t), 6) for t in e.frame_times]
    text = json.dumps(side, indent=1) + "\n"
    atomic_write_files({path: lambda f: f.write(buf.getvalue()),  # both files or neither
                        path.with_suffix(".json"): lambda f: f.write(text.encode())}, mode="wb")
    return path


def combined_bytes(done: list, pool: str, meta: dict) -> bytes:
    """All embeddings (in input order) as one safetensors file; see the module docstring."""
    meta = {**meta, "keys": json.dumps([e.item.key for e in done]),
            "sources": json.dumps([e.item.name for e in done])}
    if pool == "mean":
        return st_save({"features": np.stack([e.features for e in done])}, metadata=meta)
    offsets = np.cumsum([0] + [e.num_frames for e in done]).astype(np.int64)
    tensors = {"features": np.concatenate([e.features for e in done], axis=1),
               "frame_times": np.concatenate([e.frame_times for e in done]), "offsets": offsets}
    return st_save(tensors, metadata=meta)
