"""A byte-level text corpus that needs no download: the Python standard library's own sources.

Every machine with CPython has them. The corpus is the top-level ``*.py`` modules of the
running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), in sorted file-name
order, each file's bytes followed by byte 0 (the end-of-document / end-of-sequence token; it
never occurs in source text). Every 16th file (sorted index % 16 == 15) is held out for
validation; the others are the training split. On CPython 3.11 that is 168 files, 4.7 MB.

The two splits are cached as ``.npy`` files under ``$MOE_EP_DATA_DIR`` (default
``~/.cache/mindspore_moe_ep``), named by a hash of the file list and sizes, and built on first
use (under a second). Batches are windows at offsets drawn from a generator keyed by
``(seed, step)``, so a run is reproducible and resumes from its step alone.
"""
import glob
import hashlib
import os
import sysconfig

import numpy as np

END_OF_DOCUMENT = 0
VALIDATION_EVERY = 16
DATA_DIR_VARIABLE = "MOE_EP_DATA_DIR"


def source_files():
    """The corpus files: the standard library's top-level modules, sorted by name."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if not files:
        raise FileNotFoundError(f"no Python sources found in the standard library at {stdlib!r}; "
                                f"the byte-level corpus is built from them")
    return files


def _cache_paths(files):
    """(train .npy, validation .npy) paths, named by a hash of the file names and sizes."""
    fingerprint = hashlib.sha256()
    for path in files:
        fingerprint.update(f"{os.path.basename(path)}:{os.path.getsize(path)}\n".encode())
    directory = os.environ.get(DATA_DIR_VARIABLE,
                               os.path.join(os.path.expanduser("~"), ".cache", "mindspore_moe_ep"))
    stem = os.path.join(directory, f"stdlib-bytes-{fingerprint.hexdigest()[:16]}")
    return stem + "-train.npy", stem + "-validation.npy"


def _build(files):
    """(train, validation) uint8 arrays: documents joined, each followed by END_OF_DOCUMENT."""
    splits = ([], [])
    for index, path in enumerate(files):
        with open(path, "rb") as source:
            document = source.read().replace(bytes([END_OF_DOCUMENT]), b"")
        splits[index % VALIDATION_EVERY == VALIDATION_EVERY - 1].append(
            document + bytes([END_OF_DOCUMENT]))
    return tuple(np.frombuffer(b"".join(split), dtype=np.uint8) for split in splits)


def _save_atomically(path, array):
    """Write ``array`` to ``path`` so that concurrent readers never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp.npy"
    np.save(temporary, array)
    os.replace(temporary, path)


def load_corpus():
    """(train, validation) uint8 arrays of bytes, from the cache or built and cached."""
    files = source_files()
    train_path, validation_path = _cache_paths(files)
    if os.path.exists(train_path) and os.path.exists(validation_path):
        return np.load(train_path), np.load(validation_path)
    train, validation = _build(files)
    try:
        _save_atomically(train_path, train)
        _save_atomically(validation_path, validation)
    except OSError:  # a read-only home: the corpus still works, only uncached
        pass
    return train, validation


def windows(data, offsets, length):
    """[len(offsets), length + 1] int32: the input tokens and, shifted by one, the targets."""
    index = np.asarray(offsets)[:, None] + np.arange(length + 1)[None, :]
    return data[index].astype(np.int32)


def training_batch(data, seed, step, global_batch_size, seq_len):
    """[global_batch_size, seq_len + 1] int32: step ``step``'s windows of the training split.

    The same for every world size: rank r of W takes rows [r B / W, (r + 1) B / W).
    """
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1, step])))
    offsets = generator.integers(0, data.size - seq_len - 1, size=global_batch_size)
    return windows(data, offsets, seq_len)


def validation_batch(data, num_sequences, seq_len):
    """[num_sequences, seq_len + 1] int32: evenly spaced windows of the validation split."""
    offsets = np.linspace(0, data.size - seq_len - 1, num_sequences).astype(np.int64)
    return windows(data, offsets, seq_len)
