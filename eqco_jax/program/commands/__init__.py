"""The commands: pretraining and linear evaluation (``main``), the export,
and how every command reads its command line (``cli``)."""
