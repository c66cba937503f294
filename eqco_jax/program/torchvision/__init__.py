"""torchvision's ResNet names: the layout (``layout``), reading other
frameworks' files into a backbone (``reading``, ``config.init_from``) and
writing a run's backbone for them (``writing``, the export)."""
