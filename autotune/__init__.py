"""The command-line tools (``python -m dynconv.autotune --help`` lists them) and
:mod:`~dynconv.autotune.measure`, the measuring library they share; installed as
``dynconv.autotune``."""
