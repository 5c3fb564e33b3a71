"""Config files (`--config=configs/NAME.py[:arg]`) and the presets they share (common.py).

A package so that `from configs import common` finds this folder first when commands run from
the repository's root."""
