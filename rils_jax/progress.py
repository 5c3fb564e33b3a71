"""Progress of long work that is not a training step (indexing shards, converting records):
`N / TOTAL (P%) in S s, ETA S s` log lines, at most one every `interval` seconds, and one at
the end, so that a long silence never looks like a hang."""

import time

from absl import logging


class Progress:
  """Counts `update(n)` calls towards `total` and logs `what: N / TOTAL ...` lines.

  With `end_line=False` the line at the end is logged only when periodic lines were: work that
  is usually short (an evaluation's embedding) stays silent unless it runs long.
  """

  def __init__(self, what: str, total: int, interval: float = 10.0, end_line: bool = True):
    self.what, self.total, self.interval = what, total, interval
    self.end_line = end_line
    self.done = 0
    self.start = self._last = time.time()
    self._logged = False

  def update(self, n: int = 1) -> None:
    """Adds `n` finished items; logs when `interval` seconds passed since the last line, and
    when the total is reached."""
    self.done += n
    now = time.time()
    finished = self.done >= self.total
    if now - self._last >= self.interval or (finished and (self.end_line or self._logged)):
      self._last, self._logged = now, True
      logging.info('%s', self.line(now))

  def line(self, now: float) -> str:
    """'WHAT: N / TOTAL (P%) in S s, ETA S s' (no ETA at the end)."""
    elapsed = now - self.start
    share = self.done / max(1, self.total)
    eta = '' if self.done >= self.total or not self.done else (
        f', ETA {elapsed * (1 - share) / share:.0f} s')
    return (f'{self.what}: {self.done:,} / {self.total:,} ({100 * share:.0f}%) in '
            f'{elapsed:.0f} s{eta}')
