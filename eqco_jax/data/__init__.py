"""The data layer: where images come from and how they reach the devices.

Owns every dataset (``catalog``: each dataset's facts, the offline check
that it is there and the config's data fields the layer reads, importable
without TensorFlow; ``sources``: one ``Source`` per dataset, each in its own
module; ``folders``: an image folder's files and labels), the order, keys
and padding of examples (``streams``), host augmentation (``augment``),
images that cannot be decoded (``unreadable``), how tf.data is used
(``tfdata``) and the pipelines that feed global batches (``pipeline``). It
is the only layer that imports tensorflow and tensorflow_datasets. It may
import the core, never the program layer.
"""
