"""Optional Weights & Biases tracking: one wandb run per workdir, like open_clip's
`--report-to wandb`.

`config.wandb.mode` ('disabled' by default) turns it on: 'online' streams to the W&B server
(an API key from `wandb login` or WANDB_API_KEY), 'offline' writes the run to disk for a later
`wandb sync`. wandb is an optional dependency (requirements-wandb.txt), imported only when a
run is opened. The trainer opens the run on process 0 and gives it to `MetricWriter`, so
wandb receives the same metrics as TensorBoard, at the same steps, and the final evaluation
also as the run's summary; the run's config is the training config.

A workdir is one wandb run: its id is kept in WORKDIR/wandb_run_id.txt, so that a resumed
training run continues the same wandb run (`resume='allow'`).

Steps after a resume. wandb keeps one history row per step and requires steps that never
decrease: it drops (with a warning per call) anything logged below the last step it holds.
Training resumes from its last checkpoint, so the steps between that checkpoint and the
interruption are trained, and logged, again. `WandbRun.log` skips those steps itself (one log
line instead of a warning per call): for them wandb keeps the values the interrupted run
logged, while metrics.jsonl (where the later line of a step counts) and TensorBoard also get the
redone ones. Resumed training is the same computation, so its losses agree with the first ones
(bitwise on CPU, tests/test_faults.py); only the timings differ. The alternatives
were worse: a custom x-axis (`define_metric(step_metric=...)`) keeps both copies of each redone
step as separate history rows drawn on top of each other; wandb's history rewind
(`resume_from='ID?_step=N'`) drops the interrupted run's rows but is a private preview, online
only. In offline mode wandb (0.31) does not resume at all: each start writes its own
offline-run-*-ID folder with every step it logs (a resumed start: from the checkpoint on), and
`wandb sync WORKDIR/wandb/offline-run-*` uploads the folders to the one run ID in the order
they were started; how the server treats a step that two folders hold is W&B's choice.
"""

import importlib.util
import netrc
import os
import re
import secrets
import string
import urllib.parse
from typing import Mapping, Optional

import jax
import ml_collections
from absl import logging
from etils import epath

from rils_jax import storage

MODES = ('disabled', 'online', 'offline')
RUN_ID_FILE = 'wandb_run_id.txt'
# The folder of this checkout: wandb records its git commit (and uncommitted diff) with the run.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Characters wandb refuses in a run id (wandb.sdk.wandb_settings.validate_run_id), and blanks.
_BAD_ID = re.compile(r"[\s:;,#?/']")


def check_config(wandb_config: ml_collections.ConfigDict) -> None:
  """Checks `config.wandb` before anything is read or compiled: the mode, the types of the
  names, the tags (wandb's rule: 1-64 characters each), and that wandb is installed when the
  mode needs it (found without importing it).

  Raises:
    ValueError: naming the setting, or `pip install -r requirements-wandb.txt` when wandb is
      missing.
  """
  mode = wandb_config.mode
  if mode not in MODES:
    raise ValueError(f"config.wandb.mode must be 'disabled', 'online' or 'offline', got {mode!r}")
  for key in ('project', 'entity', 'name'):
    if not isinstance(wandb_config[key], str):
      raise ValueError(f'config.wandb.{key} must be a string, got {wandb_config[key]!r}')
  tags = wandb_config.tags
  if (not isinstance(tags, (tuple, list)) or
      not all(isinstance(t, str) and 1 <= len(t) <= 64 for t in tags)):
    raise ValueError('config.wandb.tags must be a tuple of strings of 1 to 64 characters, e.g. '
                     f"('vit_b16', 'cc12m'), got {tags!r}")
  if mode != 'disabled' and importlib.util.find_spec('wandb') is None:
    raise ValueError(f'config.wandb.mode={mode} needs wandb: pip install -r '
                     'requirements-wandb.txt')
  if mode == 'online' and not _has_api_key():
    raise ValueError('config.wandb.mode=online needs a W&B API key: run `wandb login` or set '
                     'WANDB_API_KEY (or use --config.wandb.mode=offline and `wandb sync` later)')


def _has_api_key() -> bool:
  """Whether wandb will find an API key: WANDB_API_KEY, or the ~/.netrc entry that `wandb
  login` writes for the W&B host (WANDB_BASE_URL's, default api.wandb.ai)."""
  if os.environ.get('WANDB_API_KEY'):
    return True
  host = urllib.parse.urlparse(os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')).hostname
  try:
    return netrc.netrc(os.environ.get('NETRC')).authenticators(host) is not None
  except (OSError, netrc.NetrcParseError):
    return False


class WandbRun:
  """An open wandb run: the `tracker` that `MetricWriter` logs to (process 0 only)."""

  def __init__(self, run):
    self._run = run
    self.id = run.id  # Kept after `close`.
    # wandb's next accepted step: 0 for a new run, one past the last logged step when wandb
    # resumed it (online).
    self._min_step = run.starting_step
    self._skipping = False

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs scalar metrics (numbers or 0-d arrays) as the history row of training step `step`
    (wandb's `_step`, the x-axis of its charts, as in TensorBoard). Several calls with the same
    step fill one row. A step below one already logged is skipped (see the module docstring:
    the redone steps after a resume), with one log line per run of skipped steps."""
    step = int(step)
    if step < self._min_step:
      if not self._skipping:
        logging.info('wandb: run %s continues at step %d; step %d and the other redone steps '
                     'below it were logged before the restart and are not sent again '
                     '(TensorBoard and metrics.jsonl have them)', self.id, self._min_step,
                     step)
        self._skipping = True
      return
    self._skipping = False
    self._min_step = step
    self._run.log({name: float(value) for name, value in metrics.items()}, step=step)

  def summary(self, results: Mapping[str, float]) -> None:
    """Sets the run's summary values (the final evaluation): what the W&B runs table shows."""
    self._run.summary.update({name: float(value) for name, value in results.items()})

  def close(self) -> None:
    """Finishes the run (uploads what is left when online); a second call does nothing."""
    if self._run is not None:
      self._run.finish()
      self._run = None


def run_name(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.wandb.name`, or by default the workdir's last folder name (of a URL too)."""
  if config.wandb.name:
    return config.wandb.name
  if storage.is_url(workdir):
    return workdir.rstrip('/').rsplit('/', 1)[-1]
  return os.path.basename(os.path.abspath(workdir))


def local_dir(workdir: str, run_id: str) -> str:
  """The folder given to `wandb.init(dir=...)`, under which wandb writes `wandb/` (its logs and
  the run folders: offline-run-<time>-<id>/ or run-<time>-<id>/, with the `.wandb` log of
  everything the run recorded). For a local workdir that is the workdir itself, so the files
  land in WORKDIR/wandb/. wandb writes them with local file operations only, so for a URL
  workdir (gs://...) they go to $XDG_CACHE_HOME/rils_jax/wandb/<id> (default ~/.cache/...) on
  the machine of process 0, and stay there: an offline run must be synced from that machine."""
  if not storage.is_url(workdir):
    return workdir
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'rils_jax', 'wandb', run_id)


def run_id(workdir: str, resume_step: Optional[int]) -> str:
  """The wandb run id of this workdir, from WORKDIR/wandb_run_id.txt when training resumes
  (`resume_step` is a step), else a new one written there (read and written through
  `etils.epath`: a local path or a URL). A fresh start (no checkpoint) always gets a new id,
  also where an earlier attempt wrote one before its first checkpoint: its history is another
  run's, not the start of this one. A resumed run whose workdir holds no id (wandb turned on
  after the start) gets a new one too.

  Raises:
    ValueError: when the file holds something that is not a run id.
  """
  path = epath.Path(workdir) / RUN_ID_FILE
  if resume_step is not None and path.exists():
    found = path.read_text().strip()
    if not found or _BAD_ID.search(found):
      raise ValueError(f'{path} holds {found!r}, not a wandb run id; delete the file to start a '
                       'new wandb run, or write the id of the run to continue')
    return found
  if resume_step is not None:
    logging.info('wandb: %s does not exist; a new wandb run starts at step %d', path,
                 resume_step)
  # 8 base-36 characters, like wandb's own ids (its generator is not public API).
  new_id = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(new_id + '\n')
  return new_id


def _import_wandb():
  # Imported on use only: wandb is optional, and importing it costs about a second.
  import wandb  # pylint: disable=import-outside-toplevel
  return wandb


def open_run(config: ml_collections.ConfigDict, workdir: str,
             resume_step: Optional[int]) -> Optional[WandbRun]:
  """Opens the workdir's wandb run, or returns None when `config.wandb.mode` is 'disabled'
  (nothing imported, nothing written) and on processes other than 0.

  Calls `wandb.init` with the config's project, entity, name (default: the workdir's basename)
  and tags, `config.to_dict()` as the run's config, the workdir's run id (`run_id`) with
  `resume='allow'`, and `dir=local_dir(...)`: WORKDIR/wandb/ for a local workdir.

  Args:
    config: the training config (with `config.wandb`).
    workdir: the run's workdir, a local path or a URL.
    resume_step: the checkpoint step that training resumes from, or None for a fresh start.

  Raises:
    ValueError: for a bad `config.wandb` (`check_config`) or run id file.
      Also for wandb's own errors from wandb.init (no API key, the server cannot be reached),
      with wandb's message.
  """
  check_config(config.wandb)
  if config.wandb.mode == 'disabled' or jax.process_index() != 0:
    return None
  wandb = _import_wandb()
  the_id = run_id(workdir, resume_step)
  folder = local_dir(workdir, the_id)
  os.makedirs(folder, exist_ok=True)
  settings = {}
  if os.path.exists(os.path.join(_REPO_ROOT, '.git')):
    # wandb looks for git in `dir` (the workdir), which is not the code's repository.
    settings['git_root'] = _REPO_ROOT
  try:
    run = wandb.init(project=config.wandb.project or None, entity=config.wandb.entity or None,
                     name=run_name(config, workdir), tags=list(config.wandb.tags) or None,
                     mode=config.wandb.mode, config=config.to_dict(), dir=folder, id=the_id,
                     resume='allow', settings=wandb.Settings(**settings))
  except wandb.errors.Error as e:  # No key, no network, no such entity: one line.
    raise ValueError(f'wandb could not start the run ({type(e).__name__}): {e}') from e
  logging.info('wandb: run %s (%s), files in %s', run.id, config.wandb.mode, run.dir)
  return WandbRun(run)
