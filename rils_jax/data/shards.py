"""File lists from shard patterns: brace ranges and alternatives (`shard-{00000..00099}.tar`,
`{train,extra}-*.tar`, the WebDataset / img2dataset notation, expanded by `braceexpand`), then
glob wildcards (`*`, `?`, `[...]`); several patterns separated by `::` (as WebDataset) or given as
a list. Spaces belong to the path.

Local paths and object-store URLs (`gs://...`, anything `etils.epath` opens) are accepted; a
brace-expanded name is kept as is (without a check that it exists, as WebDataset does) unless it
also holds a wildcard.
"""

import glob
from typing import List, Sequence, Union

import braceexpand
from etils import epath

from rils_jax import storage

_WILDCARDS = ('*', '?', '[')


def expand(patterns: Union[str, Sequence[str]]) -> List[str]:
  """The files that `patterns` name, in pattern order (each glob sorted), without repeats.

  Raises:
    ValueError: if a pattern is empty, a brace pattern is malformed, or a wildcard matches
      nothing.
  """
  if isinstance(patterns, str):
    patterns = patterns.split('::')
  patterns = [p.strip() for p in patterns]
  if not patterns or not all(patterns):
    raise ValueError(f'empty shard pattern in {patterns!r}')
  out = []
  for pattern in patterns:
    try:
      names = list(braceexpand.braceexpand(pattern))
    except Exception as e:  # braceexpand raises its own UnbalancedBracesError and ValueError.
      raise ValueError(f'malformed brace pattern {pattern!r}: {e}') from e
    for name in names:
      if not any(w in name for w in _WILDCARDS):
        out.append(name)
        continue
      if storage.is_url(name):
        scheme_root, _, rest = name.partition('://')
        bucket, _, inner = rest.partition('/')
        matches = sorted(str(p) for p in epath.Path(f'{scheme_root}://{bucket}').glob(inner))
      else:
        matches = sorted(glob.glob(name))
      if not matches:
        raise ValueError(f'{name!r} matches no file')
      out.extend(matches)
  return list(dict.fromkeys(out))
