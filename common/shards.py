"""Training data streamed from tar shards (the webdataset layout), read by position so a killed run resumes exactly.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by key, as webdataset and img2dataset
write them: ``<key>.jpg`` / ``.png`` / ``.jpeg`` / ``.webp`` (the image), ``<key>.txt`` (the caption) and/or
``<key>.json`` (the caption under the caption column, plus scalar columns passed through), optionally
``<key>.mask.png`` (class ids, as ``mask_file_name`` in an image folder). ``scripts/make_shards.py`` writes any
image folder (the digits world included) into shards with a ``shards.json`` index (file names and sample counts).

Why Python's ``tarfile`` and not the webdataset package: exact resume needs "start at sample p of this epoch"
without replaying the stream. Tar headers give every member's byte offset, so each worker seeks straight to its
samples, and one shard is indexed (a pass over its 512-byte headers) when a worker first enters it. webdataset's
pipeline can only skip by reading through. Shards must therefore be seekable files: local disk, NFS, a mounted
bucket; URLs are not opened.

Order of an epoch (a pure function of ``(seed, epoch)``): the shards are permuted, then the samples inside each
shard, so a reader stays in one shard at a time. Position ``p`` of the epoch goes to rank ``p % world``; a rank's
share is cut into batches of ``batch_size`` and batch ``j`` is built by DataLoader worker ``j % num_workers``.
PyTorch hands worker batches back round-robin, so the main process sees batches 0, 1, 2, ... whatever the number
of workers. A resume at batch ``b`` of an epoch starts every rank at its position ``b * batch_size``: the same
samples, in the same order, with the same augmentation (drawn from ``(seed, epoch, position)``), as the
uninterrupted run. When the number of samples is not a multiple of the world size, the epoch wraps around to its
start to give every rank the same count (as ``DistributedSampler`` does), so a few samples are seen twice.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from common.train import derive_seed  # the trainer's (seed, epoch, i) -> seed mixing, for augmentation draws


SHARD_INDEX = "shards.json"
SHARD_INDEX_FORMAT = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MASK_EXTENSION = "mask.png"


@dataclass
class ShardSample:
    """One sample of a shard: its key and, per extension, the ``(offset, size)`` of the member's bytes."""

    key: str
    members: dict[str, tuple[int, int]]


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the extension the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def scan_shard(path: Path) -> list[ShardSample]:
    """The samples of one tar shard in stored order, from its headers only (member data is skipped over)."""
    samples: list[ShardSample] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if not samples or samples[-1].key != key:
                    samples.append(ShardSample(key, {}))
                samples[-1].members[ext] = (member.offset_data, member.size)
    except tarfile.ReadError as err:
        raise UserError(f"{path} is not an uncompressed tar shard ({err}): unpack .tar.gz shards, or rewrite the "
                        "data with scripts/make_shards.py") from None
    except OSError as err:
        raise UserError(f"cannot read shard {path} ({err}): check the path and its permissions") from None
    return samples


def resolve_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files of ``source``: a folder (its ``*.tar``, sorted), a glob pattern, one ``.tar``, or a list."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        text = str(source)
        if any(ch in text for ch in "*?["):
            import glob

            paths = [Path(p) for p in sorted(glob.glob(text))]
        elif Path(text).is_dir():
            paths = sorted(Path(text).glob("*.tar"))
        else:
            paths = [Path(text)]
    if not paths:
        raise UserError(f"no .tar shards found at {source}: write them with scripts/make_shards.py or pass a "
                        "folder / glob of .tar files to --train_shards")
    for path in paths:
        if not path.is_file():
            raise UserError(f"shard {path} does not exist: pass a folder or glob of existing .tar files")
    return paths


def _shard_counts(paths: list[Path]) -> list[int]:
    """Sample counts per shard: from the folder's ``shards.json`` when it lists them, else from the headers."""
    index = paths[0].parent / SHARD_INDEX
    listed: dict[str, int] = {}
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            listed = {entry["file"]: int(entry["count"]) for entry in data["shards"]}
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index} is not a shard index (needs shards[] of file and count): delete it to "
                            "count the shards from their headers, or rewrite it with scripts/make_shards.py") from None
    counts = []
    for path in paths:
        if path.parent == index.parent and path.name in listed:
            counts.append(listed[path.name])
        else:
            counts.append(len(scan_shard(path)))
    return counts


def _permutation(n: int, *seed: int) -> np.ndarray:
    return np.random.default_rng([int(s) % 2**63 for s in seed]).permutation(n)


class ShardStream(torch.utils.data.IterableDataset):
    """Image(-caption-mask) samples from tar shards, as :class:`common.data.ImageTextDataset` items.

    Items: ``pixel_values`` ``[3, R, R]`` in [-1, 1], ``text``, ``index`` (the sample's id: its place in the shards'
    stored order, the same in every epoch), ``key``, the ``.json``'s scalar columns, and ``mask`` ``[R, R]`` when
    ``num_mask_classes`` is given and samples carry ``mask.png``. Iterating it directly gives epoch 0 on one
    process; :class:`common.train.Trainer` calls :meth:`make_loader` to shard it across ranks and workers and to
    resume by position. ``len()`` is the number of samples and ``stream[i]`` reads sample id ``i`` (no
    augmentation draw beyond a fixed one), so validation code and encoding caches work on shards too.

    Args:
        source: a folder of ``.tar`` files, a glob, one file or a list.
        caption_column: the ``.json`` key holding the caption; a ``.txt`` member is used when the json lacks it.
        require_captions: a sample without a caption is an error naming the shard and key.
        max_samples: use only the first samples of the stored order (``--max_train_samples``).
    """

    def __init__(self, source, resolution: int, *, caption_column: str = "text", require_captions: bool = True,
                 center_crop: bool = True, random_flip: bool = False, num_mask_classes: Optional[int] = None,
                 mask_ignore_index: Optional[int] = None, vae_scale_factor: int = 1, seed: int = 0,
                 max_samples: Optional[int] = None):
        if resolution < 1 or resolution % vae_scale_factor:
            raise UserError(f"resolution {resolution} is not divisible by the VAE's factor {vae_scale_factor}: "
                            "pick a multiple")
        self.paths = resolve_shards(source)
        counts = _shard_counts(self.paths)
        if max_samples is not None:
            if max_samples < 1:
                raise UserError(f"--max_train_samples must be >= 1, got {max_samples}")
            kept, left = [], max_samples
            for count in counts:
                kept.append(min(count, left))
                left -= kept[-1]
            counts = kept
        keep = [i for i, count in enumerate(counts) if count > 0]
        self.paths, self.counts = [self.paths[i] for i in keep], [counts[i] for i in keep]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_samples = int(self.starts[-1])
        if self.num_samples == 0:
            raise UserError(f"the shards at {source} hold no samples: check them with `tar tf`")
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.caption_column, self.require_captions = caption_column, require_captions
        self.num_mask_classes, self.mask_ignore_index = num_mask_classes, mask_ignore_index
        self.seed = seed
        self.fingerprint = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns, c]
                                       for p, c in zip(self.paths, self.counts)])
        self._index: dict[int, list[ShardSample]] = {}  # per process: shard number -> its samples (a few kept)
        self._files: dict[int, Any] = {}

    # ---- reading ------------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_index"] = {}, {}  # open handles do not pickle; each worker opens its own
        return state

    def __len__(self) -> int:
        return self.num_samples

    def _samples(self, shard: int) -> list[ShardSample]:
        if shard not in self._index:
            samples = scan_shard(self.paths[shard])
            if len(samples) < self.counts[shard]:
                raise UserError(f"{self.paths[shard]} holds {len(samples)} samples but its index says "
                                f"{self.counts[shard]}: rewrite {SHARD_INDEX} (scripts/make_shards.py) or delete it")
            if len(self._index) >= 4:  # a reader moves through shards in order: keep only the recent ones
                oldest = next(iter(self._index))
                self._index.pop(oldest)
                handle = self._files.pop(oldest, None)
                if handle is not None:
                    handle.close()
            self._index[shard] = samples
        return self._index[shard]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if shard not in self._files:
            self._files[shard] = open(self.paths[shard], "rb")  # noqa: SIM115 (kept open across reads, closed on evict)
        handle = self._files[shard]
        handle.seek(offset)
        return handle.read(size)

    def _decode(self, shard: int, row: int, generator: Optional[torch.Generator]) -> dict:
        from PIL import ImageOps

        from common.data import caption_fields, load_mask_ids, transform_sample
        from common.io import pil_to_rgb

        sample = self._samples(shard)[row]
        where = f"{self.paths[shard].name}: sample {sample.key!r}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
        if ext is None:
            raise UserError(f"{where} has no image ({'/'.join(IMAGE_EXTENSIONS)}; it has "
                            f"{', '.join(sorted(sample.members)) or 'nothing'}): rewrite the shard with "
                            "scripts/make_shards.py")
        meta: dict[str, Any] = {}
        if "json" in sample.members:
            try:
                meta = json.loads(self._read(shard, *sample.members["json"]).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{where}: its .json is not valid JSON: rewrite the shard") from None
            meta = meta if isinstance(meta, dict) else {}
        caption = meta.get(self.caption_column)
        if caption is None and "txt" in sample.members:
            caption = self._read(shard, *sample.members["txt"]).decode("utf-8", errors="replace").strip()
        text, captions = caption_fields(caption)
        if self.require_captions and not text:
            raise UserError(f"{where} has no caption (a .txt member or {self.caption_column!r} in its .json): "
                            "pass --caption_column or rewrite the shard")
        with Image.open(io.BytesIO(self._read(shard, *sample.members[ext]))) as im:
            im.load()
            image = pil_to_rgb(ImageOps.exif_transpose(im))
        ids = None
        if self.num_mask_classes and MASK_EXTENSION in sample.members:
            mask_bytes = io.BytesIO(self._read(shard, *sample.members[MASK_EXTENSION]))
            ids = load_mask_ids(mask_bytes, self.num_mask_classes, self.mask_ignore_index)
        item = transform_sample(image, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                                mask_ids=ids, generator=generator)
        if captions:
            text = captions[int(torch.randint(len(captions), (), generator=generator).item())]
        item.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str)) and k != self.caption_column})
        item.update(text=text, index=int(self.starts[shard]) + row, key=sample.key)
        return item

    def load(self, shard: int, row: int, seed: int) -> dict:
        """Sample ``row`` of ``shard``, augmented from ``seed``; an undecodable image falls back to the next row
        of the same shard (with a warning), so the fallback is the same in a straight and a resumed run."""
        count = self.counts[shard]
        for step in range(count):
            candidate = (row + step) % count
            try:
                return self._decode(shard, candidate, torch.Generator().manual_seed(seed))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                key = self._samples(shard)[candidate].key
                warnings.warn(f"skipping unreadable image of sample {key!r} in {self.paths[shard].name} "
                              f"({type(err).__name__})", stacklevel=2)
        raise UserError(f"no image of {self.paths[shard]} can be decoded: rewrite the shard")

    def __getitem__(self, index: int) -> dict:
        """Sample id ``index`` (stored order), augmented from a fixed draw."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        shard = bisect.bisect_right(self.starts, index) - 1
        return self.load(shard, index - int(self.starts[shard]), derive_seed(self.seed, index))

    # ---- epoch order --------------------------------------------------------------------------------------------

    def epoch_order(self, seed: int, epoch: int) -> EpochOrder:
        return EpochOrder(self.counts, seed, epoch)

    def __iter__(self) -> Iterator[dict]:
        """Epoch 0 on one process, in the epoch order of ``seed`` (single-process use; the trainer uses
        :meth:`make_loader`)."""
        view = _RankBatches(self, self.seed, 0, rank=0, world=1, batch_size=1, start=0)
        for batch in view:
            yield from batch

    def make_loader(self, *, batch_size: int, rank: int, world: int, num_workers: int = 0,
                    collate_fn: Optional[Callable] = None, seed: int = 0, device=None,
                    generator: Optional[torch.Generator] = None) -> ShardLoader:
        return ShardLoader(self, batch_size=batch_size, rank=rank, world=world, num_workers=num_workers,
                           collate_fn=collate_fn, seed=seed, device=device, generator=generator)


class EpochOrder:
    """Epoch position ``p`` -> ``(shard, row)``: shards permuted by ``(seed, epoch)``, rows by ``(seed, epoch,
    shard)``. Only the permutation of the shard being read is held in memory."""

    def __init__(self, counts: Sequence[int], seed: int, epoch: int):
        self.counts, self.seed, self.epoch = list(counts), seed, epoch
        self.shards = _permutation(len(counts), seed, epoch, 0)
        self.starts = np.concatenate([[0], np.cumsum([counts[s] for s in self.shards])]).astype(np.int64)
        self.total = int(self.starts[-1])
        self._rows: tuple[int, np.ndarray] | None = None

    def __call__(self, position: int) -> tuple[int, int]:
        position %= self.total  # the wrap-around that evens out the ranks
        slot = bisect.bisect_right(self.starts, position) - 1
        shard = int(self.shards[slot])
        if self._rows is None or self._rows[0] != shard:
            self._rows = (shard, _permutation(self.counts[shard], self.seed, self.epoch, 1, shard))
        return shard, int(self._rows[1][position - self.starts[slot]])


class _RankBatches(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch from batch ``start`` on, split across DataLoader workers (batch ``j`` by
    worker ``(j - start) % num_workers``); each element is a list of items, collated by the DataLoader."""

    def __init__(self, stream: ShardStream, seed: int, epoch: int, *, rank: int, world: int, batch_size: int,
                 start: int):
        self.stream, self.seed, self.epoch = stream, seed, epoch
        self.rank, self.world, self.batch_size, self.start = rank, world, batch_size, start
        self.per_rank = math.ceil(stream.num_samples / world)
        self.num_batches = math.ceil(self.per_rank / batch_size)

    def __iter__(self) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.stream.epoch_order(self.seed, self.epoch)
        for batch in range(self.start + worker, self.num_batches, workers):
            items = []
            for slot in range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.per_rank)):
                position = slot * self.world + self.rank
                shard, row = order(position)
                items.append(self.stream.load(shard, row, derive_seed(self.seed, self.epoch, position)))
            yield items


class ShardLoader:
    """What :class:`common.train.Trainer` trains from for a :class:`ShardStream`: this rank's batches of an epoch
    (``set_epoch``), from a batch position (``start_at``, for a resume), moved to ``device``.

    Deliberately not a ``DataLoader``: ``accelerator.prepare`` would re-shard it (every process reading every
    sample, or rank 0 reading for all), while the split here is already by rank. ``len()`` is this rank's batches.
    Each epoch builds one accelerate ``DataLoaderShard`` (device placement, end-of-data for gradient accumulation).
    """

    per_process = True  # len() already counts this process's batches (the trainer does not divide it again)

    def __init__(self, stream: ShardStream, *, batch_size: int, rank: int, world: int, num_workers: int = 0,
                 collate_fn: Optional[Callable] = None, seed: int = 0, device=None,
                 generator: Optional[torch.Generator] = None):
        if batch_size < 1:
            raise UserError(f"--train_batch_size must be >= 1, got {batch_size}")
        self.stream, self.batch_size, self.rank, self.world = stream, batch_size, rank, world
        self.num_workers, self.seed, self.device, self.generator = num_workers, seed, device, generator
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.dataset = stream
        self.epoch, self._start, self._current = 0, 0, None

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.stream.num_samples / self.world) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, batch: int) -> None:
        """The next iteration starts at batch ``batch`` of the epoch (a resume mid-epoch)."""
        self._start = batch

    def __iter__(self) -> Iterator[Any]:
        from accelerate.data_loader import DataLoaderShard

        view = _RankBatches(self.stream, self.seed, self.epoch, rank=self.rank, world=self.world,
                            batch_size=self.batch_size, start=self._start)
        self._start = 0
        self._current = DataLoaderShard(view, device=self.device, batch_size=None, num_workers=self.num_workers,
                                        collate_fn=self.collate_fn, generator=self.generator)
        yield from self._current

    def end(self) -> None:
        """Unregister the epoch's loader from accelerate's gradient state when an epoch is left early."""
        if self._current is not None:
            self._current.end()


# ---------------------------------------------------------------------------------------------- writing shards


def write_shards(items: Iterator[dict], output_dir: str | Path, *, samples_per_shard: int = 1000,
                 prefix: str = "shard") -> Path:
    """Write samples into ``output_dir/<prefix>-NNNNN.tar`` plus the ``shards.json`` index, atomically.

    Each item: ``key``, ``image`` (encoded bytes) with ``image_ext`` (``png``/``jpg``), optional ``text``, ``json``
    (a dict) and ``mask`` (PNG bytes). The folder appears only when complete (:func:`common.io.atomic_write_dir`).
    """
    import time

    from common.io import atomic_write_dir

    if samples_per_shard < 1:
        raise UserError(f"--samples_per_shard must be >= 1, got {samples_per_shard}")
    output_dir = Path(output_dir)
    shards: list[dict] = []
    with atomic_write_dir(output_dir) as tmp:
        tar, count = None, 0

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))

        for item in items:
            if tar is None or count == samples_per_shard:
                if tar is not None:
                    tar.close()
                shards.append({"file": f"{prefix}-{len(shards):05d}.tar", "count": 0})
                tar, count = tarfile.open(tmp / shards[-1]["file"], mode="w", format=tarfile.USTAR_FORMAT), 0
            key = str(item["key"])
            add(f"{key}.{item.get('image_ext', 'png')}", item["image"])
            if item.get("text") is not None:
                add(f"{key}.txt", str(item["text"]).encode("utf-8"))
            if item.get("json"):
                add(f"{key}.json", json.dumps(item["json"], ensure_ascii=False).encode("utf-8"))
            if item.get("mask") is not None:
                add(f"{key}.{MASK_EXTENSION}", item["mask"])
            count += 1
            shards[-1]["count"] = count
        if tar is not None:
            tar.close()
        if not shards:
            raise UserError("nothing to write: the source has no samples")
        index = {"format": SHARD_INDEX_FORMAT, "num_samples": sum(s["count"] for s in shards), "shards": shards}
        (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return output_dir
