"""mlmix stores in the HF Trainer and TRL's SFTTrainer, as they are: a dataset and a collator, no subclass.

    from mlmix.hf import PackedRows

    rows = PackedRows("runs/pinch/store", vocab_size=model.config.vocab_size)
    transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=rows.collator()).train()
    trl.SFTTrainer(model=model, args=config, train_dataset=rows.to_hf(), data_collator=rows.collator()).train()

:class:`PackedRows` is a map-style dataset with one item per packed row of the store (its real tokens,
labels and positions; no padding), so the trainers do what they do for any dataset, and do it right:
``per_device_train_batch_size`` counts packed rows, ``train_samples_per_second`` is packed rows per
second, the sampler shuffles rows with the Trainer's seed, accelerate shards them over ranks, and
``resume_from_checkpoint`` resumes exactly at any step of any epoch (the Trainer replays its sampler's
order; nothing mlmix-specific is saved). :meth:`PackedRows.collator` joins rows into a batch: ``flat``
(one ``(1, T)`` row with ``cu_seq_lens_*`` and ``seq_idx``, as transformers' ``DataCollatorWithFlattening``
and TRL's padding-free collator give) or ``padded`` (``(B, longest)``). Batches carry
``use_cache=False``: a model's default config would otherwise create a cache, and transformers then
ignores the example boundaries in ``position_ids`` (examples in a row would attend to each other).

For a training loop of your own, :class:`mlmix.torch.PackedDataset` (whole batches, its own exact
``state_dict``) is the faster path; the two read the same store.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

__all__ = ["PackedRows", "PackedCollator"]

_ROW_KEYS = ("input_ids", "labels", "position_ids")
_HF_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths")


class PackedRows:
    """A packed store as a map-style dataset: ``rows[i]`` is row ``i``'s ``input_ids``, ``labels`` and
    ``position_ids`` (int64 tensors of the row's real length; labels are -100 on masked tokens and on the
    first token of every example) and ``seq_lengths`` (the lengths of its examples, TRL's column for them).

    Args:
        path: the store, or a build output directory holding ``store/``.
        vocab_size: the model's vocabulary size: every row's ids are checked against it when read.
        tokenizer: the model's tokenizer: refused if the store was tokenized for another vocabulary.
        verify: check the store's checksums when opening it (see :func:`mlmix.open`).
    """

    def __init__(self, path: str | os.PathLike, *, vocab_size: int | None = None, tokenizer=None,
                 verify: bool = True) -> None:
        from .store import open as open_store

        self.store = open_store(os.fspath(path), verify=verify)  # a build output directory opens its store/
        self.path = self.store.path
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer))
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        if tokenizer is not None:
            self.store.check_tokenizer(tokenizer)
        if self.vocab_size is not None and not 0 <= self.store.pad_id < self.vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size}: the store's pad_id {self.store.pad_id} is outside the "
                             "model's vocabulary")

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i) -> dict:
        import torch

        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"PackedRows index must be an int, got {type(i).__name__}")
        n = len(self.store)
        if not -n <= int(i) < n:
            raise IndexError(f"row {int(i)} is out of range for a store of {n} rows")
        i = int(i) % n
        b = self.store.batch(np.array([i], dtype=np.int64))
        k = int(b["num_tokens"][0])
        ids = np.asarray(b["input_ids"][0, :k], dtype=np.int64)
        if self.vocab_size is not None and k and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"vocab_size={self.vocab_size}: row {i} of {self.path!r} holds token id {bad}, outside "
                             f"[0, {self.vocab_size}); the store was tokenized for another model")
        pos = np.asarray(b["position_ids"][0, :k], dtype=np.int64)
        starts = np.flatnonzero(pos == 0)
        return {"input_ids": torch.from_numpy(ids),
                "labels": torch.from_numpy(np.asarray(b["labels"][0, :k], dtype=np.int64)),
                "position_ids": torch.from_numpy(pos),
                # the examples' lengths, under TRL's name for them (its trainer keeps this column, not positions)
                "seq_lengths": torch.from_numpy(np.diff(np.append(starts, k)).astype(np.int64))}

    def __repr__(self) -> str:
        return f"PackedRows({self.path!r}, rows={len(self)}, seq_len={self.store.seq_len})"

    def collator(self, layout: str = "flat", *, pad_to_seq_len: bool = False) -> "PackedCollator":
        """The collator for these rows (``layout`` ``"flat"`` or ``"padded"``; see :class:`PackedCollator`)."""
        return PackedCollator(layout=layout, pad_id=self.store.pad_id,
                              seq_len=self.store.seq_len if pad_to_seq_len else None)

    def to_hf(self, **from_generator_kwargs):
        """These rows as a ``datasets.Dataset`` (for TRL's SFTTrainer, which takes nothing else): columns
        ``input_ids``, ``labels``, ``position_ids``, ``seq_lengths``. ``datasets`` writes them once to its Arrow cache (a copy
        of the store's tokens, 24 bytes per token); ``from_generator_kwargs`` go to
        ``datasets.Dataset.from_generator`` (e.g. ``cache_dir``)."""
        from ._deps import require

        datasets = require("datasets", "PackedRows.to_hf")
        path, verify = self.path, False  # already verified when this object opened the store

        def gen(path=path, n=len(self)):
            rows = PackedRows(path, verify=verify)
            for i in range(n):
                yield {k: v.tolist() for k, v in rows[i].items()}

        features = datasets.Features({k: datasets.List(datasets.Value("int64")) for k in _HF_COLUMNS}) \
            if hasattr(datasets, "List") else None
        return datasets.Dataset.from_generator(gen, features=features, **from_generator_kwargs)


class PackedCollator:
    """Joins packed rows (dicts of 1-D ``input_ids``, ``labels``, ``position_ids``) into a batch.

    ``layout="flat"``: one ``(1, T)`` row of every row's tokens, with ``cu_seq_lens_q``/``cu_seq_lens_k``
    (int32, example boundaries), ``max_length_q``/``max_length_k`` and ``seq_idx`` (int32 ``(1, T)``, the
    example each token belongs to, numbered within the batch; hybrid and linear-attention models use it),
    for flash-attention's varlen kernels and sdpa/eager alike. ``layout="padded"``: ``(B, L)`` rows, ``L``
    the longest row (or ``seq_len``), padded with ``pad_id``, labels -100 and position 0. Both carry
    ``use_cache=False`` (see the module docstring) and no ``attention_mask`` (a 2-D mask would make
    transformers ignore the example boundaries).
    """

    def __init__(self, layout: str = "flat", *, pad_id: int = 0, seq_len: int | None = None) -> None:
        if layout not in ("flat", "padded"):
            raise ValueError(f"layout must be 'flat' or 'padded', got {layout!r}")
        if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
            raise ValueError(f"pad_id must be an integer >= 0, got {pad_id!r}")
        self.layout, self.pad_id, self.seq_len = layout, int(pad_id), seq_len

    def __repr__(self) -> str:
        return f"PackedCollator(layout={self.layout!r}, pad_id={self.pad_id})"

    def _rows(self, features: Sequence[Any]) -> list[dict]:
        import torch

        if not features:
            raise ValueError("PackedCollator: got an empty batch")
        rows = []
        for j, f in enumerate(features):
            if not hasattr(f, "keys") or "input_ids" not in f or "labels" not in f or (
                    "position_ids" not in f and "seq_lengths" not in f):
                raise ValueError(
                    f"PackedCollator: item {j} of the batch is not a packed row (needs input_ids, labels and "
                    f"position_ids or seq_lengths, got {sorted(f.keys()) if hasattr(f, 'keys') else type(f).__name__})")
            row = {k: torch.as_tensor(f[k], dtype=torch.int64).reshape(-1) for k in ("input_ids", "labels")}
            if "position_ids" in f:
                row["position_ids"] = torch.as_tensor(f["position_ids"], dtype=torch.int64).reshape(-1)
            else:  # TRL keeps seq_lengths and drops position_ids: positions restart at every example
                lens = torch.as_tensor(f["seq_lengths"], dtype=torch.int64).reshape(-1)
                if bool((lens <= 0).any()):
                    raise ValueError(f"PackedCollator: item {j} has seq_lengths {lens.tolist()}; expected positive "
                                     "lengths")
                starts = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
                row["position_ids"] = torch.arange(int(lens.sum())) - starts
            lengths = {k: int(v.numel()) for k, v in row.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(
                    f"PackedCollator: item {j} has columns of different lengths {lengths}: something truncated "
                    "the rows after mlmix packed them (TRL's SFTConfig.max_length does, unless max_length=None "
                    "or dataset_kwargs={'skip_prepare_dataset': True})")
            if lengths["input_ids"] and int(row["position_ids"][0]) != 0:
                raise ValueError(f"PackedCollator: item {j} does not start an example (position_ids[0] = "
                                 f"{int(row['position_ids'][0])}): rows were cut or reordered")
            rows.append(row)
        return rows

    def __call__(self, features: Sequence[Any]) -> dict:
        import torch

        rows = self._rows(features)
        if self.layout == "flat":
            ids = torch.cat([r["input_ids"] for r in rows])[None]
            labels = torch.cat([r["labels"] for r in rows])[None]
            pos = torch.cat([r["position_ids"] for r in rows])[None]
            starts = torch.nonzero(pos[0] == 0).flatten()
            total = pos.shape[1]
            cu = torch.cat([starts, torch.tensor([total])]).to(torch.int32)
            seq_idx = (torch.cumsum((pos[0] == 0).to(torch.int32), 0) - 1).to(torch.int32)[None]
            max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
            return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seq_lens_q": cu,
                    "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len, "seq_idx": seq_idx,
                    "use_cache": False}
        longest = max(int(r["input_ids"].numel()) for r in rows)
        width = max(longest, self.seq_len or 0)
        b = len(rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.int64)
        labels = torch.full((b, width), -100, dtype=torch.int64)
        pos = torch.zeros((b, width), dtype=torch.int64)
        for j, r in enumerate(rows):
            n = r["input_ids"].numel()
            ids[j, :n], labels[j, :n], pos[j, :n] = r["input_ids"], r["labels"], r["position_ids"]
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}
