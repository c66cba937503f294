"""The program layer: running things, in rooms that name their jobs.

* ``commands``: what a user types (pretraining and linear evaluation,
  the export) and how every command reads its command line;
* ``run``: a pretraining run (the loop, its bookkeeping, the backbone's
  evaluation, when to stop, performance, compilation);
* ``files``: a run's files (the workdir that owns every path, run files,
  checkpoints, the lease, event files, storage);
* ``torchvision``: torchvision's ResNet names, read and written;
* ``logs``: what the program's log says and what it leaves out.

May import the core and the data layer.
"""
