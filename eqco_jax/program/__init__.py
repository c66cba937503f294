"""The program layer: running things. The training loop, the workdir and its
checkpoints, the TensorBoard writer, the evaluation of a run's backbone, the
linear evaluation and export commands, and the command line. May import the
core and the data layer."""
