"""A pretraining run: the loop (``train``), what it keeps for the summary
(``bookkeeping``), the backbone's evaluation, when it stops, how fast it
goes and how its step is compiled."""
