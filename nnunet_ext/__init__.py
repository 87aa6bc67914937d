"""nnunet-ext: recent segmentation architectures as trainers for stock nnU-Net v2.

Light on import: the registry and the topology glue are plain Python; networks and trainers
are imported where they are used, so `nnunet-ext list` or a trainer lookup never pulls in an
optional dependency.
"""

__version__ = "0.1.0"
