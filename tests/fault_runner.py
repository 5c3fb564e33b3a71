"""Runs `rils_jax.main` with a fault injected, for tests/test_faults.py.

  python -m tests.fault_runner --slow_steps=1.0 --config=... --workdir=...
  python -m tests.fault_runner --kill_in_save=6 --config=... --workdir=...

--slow_steps=S: each train step takes at least S more seconds (so that a test can signal or kill
  the process at a known step).
--late_first_step=S: process 1 starts its first train step S seconds after the others (a slow
  host; XLA:CPU's collectives once failed when a peer came more than 30 s late).
--kill_in_save=N: the process SIGKILLs itself while committing the checkpoint of step N, after
  every file of it is written and before orbax renames its temporary folder: the worst moment
  for atomicity, when the folder looks complete but is not.
"""

import asyncio
import os
import signal
import time

import jax
from absl import app
from absl import flags
from orbax.checkpoint import path as ocp_path

from rils_jax import health
from rils_jax import main as main_lib

_SLOW = flags.DEFINE_float('slow_steps', 0.0, 'Extra seconds per step.')
_LATE = flags.DEFINE_float('late_first_step', 0.0, 'Process 1 starts its first step this late.')
_KILL_IN_SAVE = flags.DEFINE_integer('kill_in_save', 0, 'Step whose checkpoint commit is killed.')


def _inject_faults():
  if _SLOW.value:
    write = health.ExampleIds.write

    def slow_write(self, step, example_ids):
      time.sleep(_SLOW.value)
      write(self, step, example_ids)

    health.ExampleIds.write = slow_write
  if _LATE.value:
    write_late = health.ExampleIds.write
    late = [_LATE.value]

    def late_write(self, step, example_ids):
      if jax.process_index() == 1 and late:
        time.sleep(late.pop())
      write_late(self, step, example_ids)

    health.ExampleIds.write = late_write
  if _KILL_IN_SAVE.value:
    temporary_path = ocp_path.atomicity.AtomicRenameTemporaryPath
    finalize = temporary_path.finalize

    async def killing_finalize(self):
      if self.get_final().name == str(_KILL_IN_SAVE.value):
        print(f'fault_runner: SIGKILL while committing {self.get()}', flush=True)
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGKILL)
      await finalize(self)

    temporary_path.finalize = killing_finalize


def main(argv):
  _inject_faults()
  main_lib.main(argv)


if __name__ == '__main__':
  main_lib._define_flags()  # pylint: disable=protected-access
  app.run(main)
