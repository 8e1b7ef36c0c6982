"""Small adapters between pandas and Ray Data."""

from __future__ import annotations

import pandas as pd
import ray.data


def dataset_from_frame(table: pd.DataFrame, rows_per_block: int = 256) -> ray.data.Dataset:
    """A Ray Dataset with contiguous blocks of about `rows_per_block` rows, in table order.

    (`from_pandas(..., override_num_blocks=...)` breaks on pandas 3, so blocks are cut here.)
    Each block gets its own 0-based index: Ray Data's `with_column` aligns a pandas block's new
    column by index, so a block indexed 256..511 got NaN in every row (training's per-row
    random draw `u` did, for catalogue sources).
    """
    table = table.reset_index(drop=True)
    starts = range(0, max(len(table), 1), rows_per_block)
    return ray.data.from_pandas(
        [table.iloc[s : s + rows_per_block].reset_index(drop=True) for s in starts]
    )
