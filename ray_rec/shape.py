"""What a data set's shape (its users' average clicks) chooses of the model while unset.

No imports of the package: `ray_rec.config` reads these.
"""

from __future__ import annotations

from typing import NamedTuple

# History length, dropout and the tracker's depth follow the data set unless set: SASRec's own
# choices on sparse data (users averaging 7-11 clicks: dropout 0.5) and on dense data (dropout 0.2,
# two blocks); the data set is "long" from this many clicks per user on. The history window is half
# a user's average clicks, between 50 and 200 (`history_window`): a window as long as the whole
# history leaves one window a user, so few steps an epoch and little variety in them.
# Training examples are one per next click on every shape (`prefixes`: each target predicted from a
# history ending at its last step, as served histories end); `windows` (every step of L clicks
# trained at once, though most steps' newest click sits far from the window's end) cost the sequence
# networks about 1/L the work per click: an option for long histories on slow hardware.
LONG_HISTORY_CLICKS = 40.0
EXAMPLES = ("prefixes", "windows")
# Examples a step while `train.batch_size` is unset: a prefix holds one target, a window up to L.
BATCH_SIZE = {"prefixes": 256, "windows": 128}


class HistoryDefaults(NamedTuple):
    """The ``ModelConfig`` fields a data set fills while they are unset, by their names there."""

    max_len: int
    dropout: float
    tracker_layers: int
    examples: str


SHORT_HISTORY = HistoryDefaults(max_len=50, dropout=0.5, tracker_layers=1, examples="prefixes")
LONG_HISTORY = HistoryDefaults(max_len=200, dropout=0.2, tracker_layers=2, examples="prefixes")  # max_len: the longest window


def history_window(clicks_per_user: float) -> int:
    """The history length a data set gets: half its users' average clicks, in tens, within
    [SHORT_HISTORY.max_len, LONG_HISTORY.max_len].

    Example:
        >>> history_window(9), history_window(106), history_window(165), history_window(1000)
        (50, 50, 80, 200)
    """
    return min(max(10 * round(clicks_per_user / 20), SHORT_HISTORY.max_len), LONG_HISTORY.max_len)
