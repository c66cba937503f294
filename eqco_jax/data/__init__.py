"""The data layer: where images come from and how they reach the devices.

Owns every dataset (``catalog``: each dataset's facts and the offline check
that it is there, importable without TensorFlow; ``sources``: one ``Source``
per dataset), the order, keys and padding of examples (``streams``), host
augmentation (``augment``) and the tf.data pipelines that feed global batches
(``pipeline``). It is the only part of eqco_jax that imports tensorflow and
tensorflow_datasets. It may import the core (``eqco_jax.config``,
``sharding``, ``device_augment``, ``errors``), never the programs
(``train``, ``evaluate``, ``checkpointing``, ``main``, ``linear_eval``).
"""
